"""One trainer for every model in this repository.

    python train.py --model fastmetro --preset tiny --train data/synth/train.npz --val data/synth/test.npz
    torchrun --nproc_per_node 8 train.py --model deformer --preset paper --train cfg.yaml ...
    torchrun --nproc_per_node 2 train.py --model tore --preset tiny --device cpu ...   # gloo

What it does, in order: builds the body model (toy body by default, or real SMPL with --body),
the model (`build_model`: preset -> backbone -> topology -> model), the datasets (SPIN npz or
METRO TSV, mixed with weights), then runs a step-based loop with DDP, bf16 autocast on GPU,
gradient accumulation, clipping and the paper's optimiser/schedule (each model file's
TRAIN_DEFAULTS), and evaluates periodically (evaluate.py). Ground-truth meshes are computed from
the SMPL parameters on the device inside the loop.

Checkpoints (`last.pt`, and `step_XXXXXXX.pt` with --keep-every) are written atomically (temp
file + fsync + os.replace) and hold the model, optimiser, scheduler, step, the RNG states and the
config. `--resume` continues exactly: the data order depends only on (seed, epoch), augmentation
only on (seed, epoch, sample index), the loader's workers are seeded from a generator derived
from (seed, epoch), and the global RNG state (dropout) is restored, so the loss sequence after a
resume equals the uninterrupted one.

Guards (issue 15): without --train it trains on the embedded default (data/synth, made once by
rank 0 while the others wait); under torchrun a setup error is printed once (rank 0). A rank
with fewer samples than one optimizer step stops with the numbers instead of looping over empty
epochs. --resume refuses settings that break exact resume (RESUME_KEYS) unless
--allow-config-change names them, keeps the checkpoint's config (+ `resume_history`) and drops
log records after the checkpoint's step. A full disk is reported as such, the temp file is
removed, and stale temp files of dead saves are removed at start. --skip-bad prints a summary
and stops above --max-bad; collectives fail after --dist-timeout minutes instead of 30 silent ones.
"""
import argparse
import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints as ckpt_lib
import data as data_lib
import metrics as eval_lib
from checkpoints import MODELS, build_body, build_model, model_module, parse_overrides  # noqa: F401

J24_TO_LSP = eval_lib.J24_TO_LSP


# ----------------------------------------------------------------------------- data
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "synth"   # the embedded default (no --train)


def ensure_default_data(sizes="3000,300", is_main=True, root=None, wait_minutes=240.0):
    """The embedded default dataset: `root`/train.npz and test.npz (synthetic, toy body), made
    on rank 0 if missing (once; later runs reuse them) while the other ranks wait for both files
    (written atomically). Called before the process group exists, so making the data is not
    bound by --dist-timeout; a multi-node run needs a shared filesystem (or prepared data).
    sizes: "N_TRAIN,N_TEST". Returns (train npz, test npz) as strings."""
    root = Path(root or DEFAULT_DATA)
    try:
        n_train, n_test = (int(x) for x in str(sizes).split(","))
    except ValueError:
        raise ValueError(f"--synth-n expects TRAIN,TEST sample counts, got {sizes!r}") from None
    if is_main:
        for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
            if not (root / f"{split}.npz").is_file():
                print(f"no --train given: making the default synthetic {split} set ({n} images) in "
                      f"{root} (once; later runs reuse it)", flush=True)
                data_lib.generate_synthetic(root, n, split=split, seed=seed)
    else:
        t0 = time.time()
        while not ((root / "train.npz").is_file() and (root / "test.npz").is_file()):
            if time.time() - t0 > wait_minutes * 60:   # torchrun ends us sooner if rank 0 fails
                raise TimeoutError(f"waited {wait_minutes} min for rank 0 to make {root}/train.npz and "
                                   "test.npz; pass --train (prepared data) instead")
            time.sleep(1.0)
    return str(root / "train.npz"), str(root / "test.npz")


def describe_train_data(dataset, is_main):
    """Print each training dataset's size and the supervision it provides; stop when one
    provides none."""
    for d in getattr(dataset, "datasets", [dataset]):
        sup = d.supervision()
        if not any(sup.values()):
            raise data_lib.DataError(d.source, "-", "S/part/pose",
                                     "provides no supervision (no 2D joints, 3D joints or SMPL "
                                     "parameters): nothing to train on")
        if is_main:
            words = ", ".join(f"{k} {'yes' if v is True else 'no' if v is False else v}"
                              for k, v in sup.items())
            print(f"train data {d.source}: {len(d)} samples; supervision: {words}", flush=True)


def check_bad_upfront(dataset, max_bad, is_main):
    """--skip-bad: summarise the samples dropped while opening the datasets; stop above --max-bad."""
    for d in getattr(dataset, "datasets", [dataset]):
        n_bad = getattr(d, "num_bad", 0)
        if not n_bad:
            continue
        total = len(d) + n_bad
        first = "; ".join(list(d.bad.values())[:3])
        if n_bad / total > max_bad:
            raise data_lib.DataError(d.source, "-", "*", f"{n_bad} of {total} samples are bad "
                                     f"({n_bad / total:.0%}, above --max-bad {max_bad}); first: {first}")
        if is_main:
            print(f"--skip-bad: dropped {n_bad} of {total} samples of {d.source}; first: {first}",
                  flush=True)


def check_bad_reads(bad, reads, world, max_bad, dataset, min_reads=32):
    """--skip-bad at load time: (bad reads, all reads) summed over ranks; raises above --max-bad
    once at least `min_reads` samples were read. A read counts as bad each time a bad sample
    is skipped, so the fraction estimates the bad fraction of the data in random order."""
    counts = torch.tensor([float(bad), float(reads)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
    bad, reads = int(counts[0]), int(counts[1])
    total = bad + reads
    if total >= min_reads and bad / total > max_bad:
        reasons = [r for d in getattr(dataset, "datasets", [dataset]) for r in d.bad.values()][:3]
        raise data_lib.DataError(getattr(dataset, "source", "training data"), "-", "*",
                                 f"--skip-bad: {bad} of {total} sample reads hit bad samples "
                                 f"({bad / total:.0%}, above --max-bad {max_bad}); first: "
                                 f"{'; '.join(reasons) or 'reported by the loader workers'}")
    return bad, total


def make_train_dataset(spec, img_root, input_size, seed, skip_bad=False, augment=None):
    """`spec`: comma-separated datasets, each `PATH[@WEIGHT]` (npz or TSV yaml); `augment`: the
    augmentation strengths (data.HMRDataset keywords: flip_prob, rot_factor, ...)."""
    parts, weights = [], []
    for item in spec.split(","):
        path, _, w = item.partition("@")
        parts.append(data_lib.open_dataset(path, img_root=img_root, train=True, input_size=input_size,
                                           seed=seed, skip_bad=skip_bad, **(augment or {})))
        weights.append(float(w) if w else 1.0)
    if len(parts) == 1:
        return parts[0], None
    return data_lib.MixedDataset(parts), weights


def training_smpl_params(dataset):
    """(pose (N,72), betas (N,10)) of the samples with SMPL labels in npz datasets, else None."""
    parts = getattr(dataset, "datasets", [dataset])
    poses, betas = [], []
    for d in parts:
        arrays = getattr(d, "d", None)
        if arrays is None or "pose" not in arrays or "shape" not in arrays:
            continue
        keep = arrays["has_smpl"] > 0 if "has_smpl" in arrays else np.ones(len(arrays["pose"]), bool)
        poses.append(arrays["pose"][keep])
        betas.append(arrays["shape"][keep])
    if not poses or sum(len(p) for p in poses) == 0:
        return None
    return np.concatenate(poses), np.concatenate(betas)


def trim_log(path, step):
    """Drop the log records after `step` (written after the checkpoint a resume starts from, so
    they would be logged twice) and lines cut short by a kill; returns the kept records."""
    path = Path(path)
    if not path.is_file():
        return []
    keep, kept_recs = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
            kept_recs.append(rec)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)
    return kept_recs


# Settings whose change breaks an exact resume (data order, augmentation, model, optimiser,
# schedule); --resume refuses a change unless --allow-config-change names it.
RESUME_KEYS = ("model", "preset", "set", "train", "body", "h36m_regressor", "pretrained_backbone",
               "batch_size", "accum", "lr", "weight_decay", "clip", "warmup_steps", "lr_drop_at",
               "total_steps", "seed", "world_size", "amp", "skip_bad", "flip_prob", "rot_factor",
               "scale_factor", "noise_factor")


def resumed_config(old, new, allow, path, step):
    """The config a resumed run keeps: the checkpoint's, with the run-time options (out,
    workers, logging, ...) of this invocation, the allowed changes and a `resume_history` entry.
    Raises ValueError listing every refused difference (key, checkpoint value, new value)."""
    allow = allow.strip()
    allowed = set(RESUME_KEYS) if allow == "all" else {k.strip().replace("-", "_")
                                                        for k in allow.split(",") if k.strip()}
    unknown = sorted(allowed - set(RESUME_KEYS))
    if unknown:
        raise ValueError(f"--allow-config-change: unknown key(s) {unknown}; choose from {', '.join(RESUME_KEYS)} or all")
    diff = {k: (old[k], new[k]) for k in RESUME_KEYS if k in old and k in new and old[k] != new[k]}
    refused = {k: v for k, v in diff.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"--resume: {path} was trained with other settings ({listed}). Changing them "
                         "breaks exact resume: pass the checkpoint's values, or --allow-config-change "
                         f"{','.join(refused)} to accept the change (recorded in the checkpoint's "
                         "config), or start a new run with another --out.")
    merged = dict(old)
    merged.update({k: v for k, v in new.items() if k not in RESUME_KEYS and k != "model_config"})
    merged.update({k: b for k, (a, b) in diff.items()})
    merged["resume_history"] = list(old.get("resume_history", [])) + [
        {"step": step, "changed": {k: [a, b] for k, (a, b) in diff.items()}}]
    return merged, diff


def make_eval_loader(spec, img_root, input_size, batch_size, workers):
    ds = data_lib.open_dataset(spec, img_root=img_root, train=False, input_size=input_size)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=data_lib.collate, persistent_workers=False)


class EpochSampler(torch.utils.data.Sampler):
    """Indices for one epoch on this rank, determined by (seed, epoch) alone; can skip a prefix.

    Uniform shuffling (DistributedSampler) or per-dataset weights (data.WeightedMixedSampler).
    `skip` drops the first `skip` indices of the epoch, which is how --resume continues mid-epoch.
    """

    def __init__(self, dataset, seed, rank, world, weights=None, num_samples=None):
        self.dataset, self.seed, self.rank, self.world = dataset, seed, rank, world
        self.weights = weights
        self.epoch, self.skip = 0, 0
        if weights is None:
            self.inner = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                             shuffle=True, seed=seed, drop_last=True)
        else:
            self.inner = data_lib.WeightedMixedSampler(dataset, weights, num_replicas=world, rank=rank,
                                                       seed=seed, num_samples=num_samples)

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self):
        return len(self.inner) - self.skip


def make_targets(batch, body_model, device, epoch):
    """Dataset batch -> the `targets` dict every model's loss takes (see the contract in README)."""
    pose = batch["pose"].to(device, non_blocking=True)
    betas = batch["betas"].to(device, non_blocking=True)
    has_smpl = batch["has_smpl"].to(device).float()
    with torch.no_grad():
        vertices = body_model(betas, pose)["vertices"]                       # (B, V, 3) metres
        vertices = vertices * has_smpl[:, None, None]
    j3d = batch["joints3d"].to(device)[:, J24_TO_LSP]                        # (B, 24, 4) -> (B, 14, 4)
    j2d = batch["joints2d"].to(device)[:, J24_TO_LSP]                        # (B, 24, 3) -> (B, 14, 3)
    return {"joints3d": j3d, "joints2d": j2d, "vertices": vertices, "has_smpl": has_smpl,
            "has_3d": batch["has_3d"].to(device).float(), "pose": pose, "betas": betas,
            "epoch": float(epoch)}


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    On failure the temp file is removed and the previous `path` is left as it was; a full disk
    is reported as "no space left on DEVICE while writing FILE" (torch itself says only
    "unexpected pos" when its writer fails)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, tmp)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if full:
            raise OSError(errno.ENOSPC, f"no space left on {_filesystem_of(path)} while writing {path} "
                          f"(the temp file was removed; the previous {path.name}, if any, is intact): "
                          "free some space or write checkpoints elsewhere (--out)") from e
        raise


def _disk_full(err, tmp):
    """True if writing `tmp` failed because its filesystem is full: ENOSPC/EDQUOT, or torch's
    bare writer RuntimeError while (almost) no space is left next to `tmp`."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, RuntimeError):
        try:
            st = os.statvfs(tmp.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1 << 20          # under 1 MiB left
    return False


def _filesystem_of(path):
    """'device DEV (mounted at M)' for the filesystem holding `path` (best effort)."""
    mount = Path(os.path.abspath(path)).parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    dev = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1] == str(mount):
                dev = parts[0]
    return f"device {dev} (mounted at {mount})" if dev else f"the device mounted at {mount}"


def remove_stale_temp_files(out):
    """Remove the temp files of checkpoint saves in `out` whose writing process is gone (a save
    killed, or failed on a full disk, before this start); returns the removed paths."""
    removed = []
    for tmp in Path(out).glob(".*.pt.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        with contextlib.suppress(OSError):
            size = tmp.stat().st_size
            tmp.unlink()
            removed.append(tmp)
            print(f"removed stale temp file {tmp} ({size} bytes) left by an interrupted checkpoint save",
                  flush=True)
    return removed


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj):
    """RNG states contain tuples and numpy arrays; keep them loadable with weights_only=True."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, tuple):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, list):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _from_plain_rng(state):
    py = state["python"]
    np_state = state["numpy"]
    out = {"python": (py[0], tuple(py[1]), py[2]),
           "numpy": (np_state[0], np_state[1].numpy(), np_state[2], np_state[3], np_state[4]),
           "torch": state["torch"].to(torch.uint8)}
    if "cuda" in state:
        out["cuda"] = [t.to(torch.uint8) for t in state["cuda"]]
    return out


RESUME_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "pos", "rng", "config")


def load_checkpoint(path, map_location="cpu", required=("model",)):
    """checkpoints.load_checkpoint, requiring the keys a train.py checkpoint holds."""
    return ckpt_lib.load_checkpoint(path, map_location, required)


load_model_from_checkpoint = ckpt_lib.load_model_from_checkpoint     # moved to checkpoints.py


# ----------------------------------------------------------------------------- distributed
DIST_TIMEOUT_MINUTES = 15.0
def setup_distributed(device_arg, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """(rank, world, device); joins the process group under torchrun. `timeout_minutes`: how
    long a collective waits for a stalled rank before it fails with an error (torch's default is
    30 minutes of silence); it must exceed the longest rank-0-only pause (evaluation with
    --eval-every)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = device_arg != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        # CPU tensors (loss flags, counters, replica check) go through gloo even on GPUs: NCCL
        # alone refuses them ("No backend type associated with device type cpu").
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        return rank, world, device
    dev = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 1, torch.device(dev)


def replica_spread(model, world):
    """Largest difference of any parameter between ranks (0.0 means the replicas are in sync)."""
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
    if world == 1:
        return 0.0
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def all_finite(value, world):
    """True on every rank iff the loss is finite on every rank (so all ranks skip/stop together)."""
    flag = torch.tensor([1.0 if math.isfinite(value) else 0.0])
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


# ----------------------------------------------------------------------------- training
def parse_fractions(text, option):
    """"0.6,0.9" -> [0.6, 0.9]; each in (0, 1), else a ValueError naming the option."""
    try:
        fractions = [float(f) for f in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated fractions of training such as 0.8, "
                         f"got {text!r}") from None
    bad = [f for f in fractions if not 0 < f < 1]
    if bad:
        raise ValueError(f"{option}: every fraction must lie in (0, 1), got {bad} in {text!r}")
    return fractions


def lr_lambda_factory(drop_steps, gamma=0.1):
    def f(step):
        return gamma ** sum(step >= s for s in drop_steps)
    return f


class _RankZeroParser(argparse.ArgumentParser):
    """Under torchrun only rank 0 prints usage errors (not one copy per process)."""

    def error(self, message):
        if _rank() != 0:
            time.sleep(2)      # let rank 0 print first: torchrun stops the others at the first exit
            sys.exit(2)
        super().error(message)


def _rank():
    return int(os.environ.get("RANK", "0"))


def parse_args(argv=None):
    p = _RankZeroParser(description="Train FastMETRO / TORE / DeFormer / FeatUp-HMR.")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the preset, e.g. --set dropout=0.0")
    p.add_argument("--train", default=None,
                   help="PATH[@WEIGHT],... (SPIN npz or METRO TSV yaml); default: the embedded "
                        f"synthetic set {DEFAULT_DATA}/train.npz (made on first use, see --synth-n)")
    p.add_argument("--val", default=None, help="evaluation dataset (npz or TSV yaml); default with "
                   f"no --train: {DEFAULT_DATA}/test.npz")
    p.add_argument("--synth-n", default="3000,300", metavar="TRAIN,TEST",
                   help="sizes of the default synthetic train/test sets when they must be made")
    p.add_argument("--img-root", default=None, help="image root for npz datasets (default: npz folder)")
    p.add_argument("--body", default=None, help="SMPL .pkl (default: the procedural toy body)")
    p.add_argument("--h36m-regressor", default=None, help="J_regressor_h36m_correct.npy for real SMPL")
    p.add_argument("--pretrained-backbone", default=None)
    p.add_argument("--weights", default=None,
                   help="initialise from a released state dict (official key layout) of --model/--preset")
    p.add_argument("--mesh-hierarchy", default=None,
                   help="GraphCMR mesh_downsampling.npz (default: the body's decimated hierarchy)")
    p.add_argument("--protocol", default=eval_lib.DEFAULT_PROTOCOL, choices=eval_lib.PROTOCOLS,
                   help="evaluation protocol of the periodic evaluation (metrics.py)")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per GPU / process (default: the model's TRAIN_DEFAULTS batch_per_gpu); "
                        "global batch = this x world size x --accum")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--clip", type=float, default=None, help="gradient clip (norm or value, per model)")
    p.add_argument("--epochs", type=float, default=None, help="default: the paper's")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this time")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--lr-drop-at", default=None, metavar="FRACTION[,FRACTION]",
                   help="multiply the lr by 0.1 at these fractions of the training steps (replaces "
                        "the paper's drop epochs), e.g. 0.8")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA)")
    p.add_argument("--flip-prob", type=float, default=0.5, help="augmentation (FastMETRO defaults)")
    p.add_argument("--rot-factor", type=float, default=30.0, help="rotation std in degrees")
    p.add_argument("--scale-factor", type=float, default=0.25)
    p.add_argument("--noise-factor", type=float, default=0.4, help="per-channel pixel noise U[1-f, 1+f]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at end)")
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--keep-every", type=int, default=0, help="also keep step_N.pt every N steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    p.add_argument("--on-nan", choices=["stop", "skip"], default="stop")
    p.add_argument("--max-skips", type=int, default=20,
                   help="with --on-nan skip: stop after this many non-finite losses in a row")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (counted)")
    p.add_argument("--max-bad", type=float, default=0.1,
                   help="with --skip-bad: stop when more than this fraction of the samples read is bad")
    p.add_argument("--allow-config-change", default="", metavar="KEY,KEY|all",
                   help="with --resume: accept these differences from the checkpoint's config "
                        f"(any of {', '.join(RESUME_KEYS)}); they break exact resume")
    p.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="fail (instead of waiting silently) when a rank stalls this long")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="exit right after this step (and its checkpoint), as if interrupted")
    return p.parse_args(argv)


def train(args, status=None):
    """Run training; `status["stage"]` says how far it got ("setup", then "training") so the
    command line can tell setup errors (the same on every rank) from per-rank ones."""
    status = status if status is not None else {}
    status["stage"] = "setup"
    # Checked before any data or model is built (a typo should not cost the setup).
    drop_fractions = parse_fractions(args.lr_drop_at, "--lr-drop-at") if args.lr_drop_at else []
    if args.train is None:
        args.train, default_val = ensure_default_data(args.synth_n, _rank() == 0)
        args.val = args.val or default_val
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    is_main = rank == 0
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    if world > 1 and not is_main:
        dist.barrier()          # rank 0 fills the on-disk caches (toy body, mesh hierarchy) first
    body_model = build_body(args.body, args.h36m_regressor).to(device)
    if args.weights:
        ckpt_lib.check_official_hierarchy(body_model, args.mesh_hierarchy)
    hierarchy, hierarchy_id = ckpt_lib.load_hierarchy(body_model, args.mesh_hierarchy)
    model, cfg = build_model(args.model, args.preset, body_model, args.pretrained_backbone,
                             parse_overrides(args.set), "cpu", hierarchy=hierarchy)
    if args.weights:
        model.topology_used = body_model.topology(hierarchy=hierarchy)
        init = ckpt_lib.load_official_weights(model, args.model, args.preset, args.weights, body_model)
        if is_main:
            print(f"initialised from {args.weights} ({init['num_tensors']} tensors, strict)", flush=True)
    model = model.to(device)
    if world > 1 and is_main:
        dist.barrier()
    defaults = dict(model_module(args.model).TRAIN_DEFAULTS)
    batch_size = args.batch_size or defaults["batch_per_gpu"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    wd = args.weight_decay if args.weight_decay is not None else defaults.get("weight_decay", 1e-4)
    clip = args.clip if args.clip is not None else defaults.get("clip_grad_norm")
    clip_mode = defaults.get("clip_mode", "norm")

    augment = dict(flip_prob=args.flip_prob, rot_factor=args.rot_factor,
                   scale_factor=args.scale_factor, noise_factor=args.noise_factor)
    train_set, weights = make_train_dataset(args.train, args.img_root, cfg.input_size, args.seed,
                                            args.skip_bad, augment)
    describe_train_data(train_set, is_main)
    if args.skip_bad:
        check_bad_upfront(train_set, args.max_bad, is_main)
    sampler = EpochSampler(train_set, args.seed, rank, world, weights)
    if len(sampler) // batch_size < args.accum:    # the loop would go from epoch to epoch forever
        per_step = batch_size * args.accum
        raise ValueError(
            f"too few training samples: {len(train_set)} samples over {world} rank(s) give "
            f"{len(sampler)} per rank per epoch, fewer than one optimizer step needs (--batch-size "
            f"{batch_size} x --accum {args.accum} = {per_step} per rank), so no step could ever run. "
            + (f"Use --batch-size {len(sampler) // args.accum} or less, " if len(sampler) >= args.accum else "")
            + "fewer processes (--nproc_per_node), or more data.")
    steps_per_epoch = len(sampler) // (batch_size * args.accum)
    epochs = args.epochs if args.epochs is not None else defaults.get("epochs", 60)
    total_steps = args.steps or int(math.ceil(epochs * steps_per_epoch))
    drop_steps = [int(e * steps_per_epoch) for e in defaults.get("lr_drop_epochs", [])]
    if args.steps and defaults.get("lr_drop_epochs") and args.epochs is None:
        # With an explicit step budget, put the drops at the same fraction of training.
        drop_steps = [int(total_steps * e / defaults.get("epochs", 60)) for e in defaults["lr_drop_epochs"]]
    if drop_fractions:
        drop_steps = [int(total_steps * f) for f in drop_fractions]

    if is_main:
        print(f"batch: {batch_size} per GPU x world size {world} x accum {args.accum} = global batch "
              f"{batch_size * world * args.accum}; lr {lr:g} (paper: {defaults.get('paper_global_batch', 'n/a')} "
              "global at this lr; the lr is not scaled with the batch)", flush=True)

    if hasattr(model, "set_mean_params") and not getattr(cfg, "mean_params_path", None):
        # Iterative error feedback starts from the mean SMPL parameters of the training data.
        smpl = training_smpl_params(train_set)
        if smpl is not None:
            model.set_mean_params(model_module(args.model).mean_params_from_dataset(*smpl))
            if is_main:
                print(f"mean SMPL parameters from {len(smpl[0])} training samples", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    warm = args.warmup_steps
    decay = lr_lambda_factory(drop_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: decay(s) * (min(1.0, (s + 1) / warm) if warm else 1.0))

    config = {**vars(args), "batch_size": batch_size, "lr": lr, "weight_decay": wd, "clip": clip,
              "clip_mode": clip_mode, "total_steps": total_steps, "world_size": world,
              "global_batch": batch_size * world * args.accum, "mesh_hierarchy_identity": hierarchy_id,
              "h36m_regressor_identity": ckpt_lib.regressor_identity(body_model),
              "model_config": dataclasses.asdict(cfg)}
    step, epoch, pos = 0, 0, 0          # pos: samples of the current epoch this rank consumed
    ckpt_path = out / "last.pt"
    if args.resume and not ckpt_path.exists():
        if is_main:
            print(f"--resume: no checkpoint at {ckpt_path}; starting from scratch", flush=True)
    elif args.resume:
        ck = load_checkpoint(ckpt_path, map_location=device, required=RESUME_CHECKPOINT_KEYS)
        ckpt_lib.check_hierarchy_identity(ck["config"].get("mesh_hierarchy_identity"), hierarchy_id, ckpt_path)
        config, changed = resumed_config(ck["config"], config, args.allow_config_change, ckpt_path, ck["step"])
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if "lr" in changed or "weight_decay" in changed:     # allowed changes take effect now
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["initial_lr"], g["weight_decay"] = lr, wd
                g["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        step, epoch, pos = ck["step"], ck["epoch"], ck["pos"]
        rng = ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0]
        set_rng_state(_from_plain_rng(rng))
        if is_main:
            print(f"resumed from {ckpt_path} at step {step} (epoch {epoch}, sample {pos})", flush=True)
            for k, (a, b) in changed.items():
                print(f"  --allow-config-change: {k} {a!r} -> {b!r} (exact resume no longer holds)")
    elif ckpt_path.exists() and is_main:
        print(f"note: starting from scratch; {ckpt_path} of an earlier run will be overwritten "
              "(pass --resume to continue it)", flush=True)

    # Every model's tiny preset gives every parameter a gradient each step
    # (tests/test_all_parameters_used.py), so DDP skips the unused-parameter search; the DeFormer
    # presets use backbones without a classification head (a backbone with one, set by hand,
    # makes DDP stop at the first step with its own message naming the unused parameters).
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=False) if world > 1 else model
    use_amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    logged_evals = set()
    if is_main and args.resume:
        logged_evals = {r["step"] for r in trim_log(out / "log.jsonl", step) if "eval" in r}
    log_file = open(out / "log.jsonl", "a") if is_main else None
    val_loader = baseline = None
    if args.val and is_main:
        val_loader = make_eval_loader(args.val, args.img_root, cfg.input_size, batch_size, args.workers)

    def save(final=False):
        states = [None] * world
        # Gather as numpy (pickling torch tensors through all_gather_object is fragile), then
        # store tensors/lists so the checkpoint loads with weights_only=True.
        local = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in rng_state().items()}
        if "cuda" in local:
            local["cuda"] = [t.numpy() for t in local["cuda"]]
        if world > 1:
            dist.all_gather_object(states, local)
        else:
            states = [local]
        states = [_to_plain(st) for st in states]
        if is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "pos": pos,
                     "rng": states, "config": config}
            atomic_save(state, ckpt_path)
            if args.keep_every and step % args.keep_every == 0:
                atomic_save(state, out / f"step_{step:07d}.pt")

    def run_eval():
        nonlocal baseline
        if val_loader is None:
            return None
        if baseline is None:
            base_loader = make_eval_loader(args.train.split(",")[0].partition("@")[0], args.img_root,
                                           cfg.input_size, batch_size, args.workers)
            baseline = eval_lib.mean_pose_baseline(base_loader, body_model, device, args.protocol)
        res = eval_lib.evaluate(model, val_loader, body_model, device, args.protocol,
                                max_batches=args.eval_batches, baseline=baseline)
        eval_lib.print_table(res, f"Evaluation at step {step} (mm)")
        if step not in logged_evals:              # a resumed, finished run evaluates again
            log_file.write(json.dumps({"step": step, "eval": res}) + "\n")
            log_file.flush()
            logged_evals.add(step)
        return res

    progress = None
    if is_main and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, desc=f"{args.model}-{args.preset}",
                        dynamic_ncols=True, file=sys.stdout)
    t_start = time.time()
    t_last, imgs_since = time.time(), 0
    stop = False
    skipped_in_a_row = 0
    bad_reads = reads = 0                 # --skip-bad accounting on this rank
    bad_total = (0, 0)
    status["stage"] = "training"
    model.train()
    while step < total_steps and not stop:
        sampler.set_epoch(epoch, skip=pos)
        train_set.set_epoch(epoch)          # augmentation depends on (seed, epoch, index) only
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch_size, sampler=sampler, num_workers=args.workers,
            collate_fn=data_lib.collate, drop_last=True, pin_memory=device.type == "cuda",
            worker_init_fn=data_lib.worker_init_fn,
            generator=torch.Generator().manual_seed(args.seed * 1000003 + epoch))
        micro = 0
        steps_before = step
        for batch in loader:
            targets = make_targets(batch, body_model, device, epoch + pos / max(1, len(sampler.inner)))
            images = batch["img"].to(device, non_blocking=True)
            sync = (micro + 1) % args.accum == 0
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    outputs = ddp_model(images)
                # Losses in float32 outside autocast (a bf16 joint-regressor einsum loses mm).
                outputs = _float32(outputs)
                loss, logs = model.loss(outputs, targets)
                (loss / args.accum).backward()
            micro += 1
            pos += images.shape[0]
            imgs_since += images.shape[0] * world
            if args.skip_bad and "num_skipped" in batch:
                bad_reads += int(batch["num_skipped"].sum())
                reads += images.shape[0]
            if not sync:
                continue
            if args.skip_bad:
                bad_total = check_bad_reads(bad_reads, reads, world, args.max_bad, train_set)
            loss_value = float(loss.detach())
            if not all_finite(loss_value, world):
                if args.on_nan == "stop":
                    raise FloatingPointError(
                        f"non-finite loss {loss_value} at step {step} (epoch {epoch}); parts: {logs}. "
                        "Lower the lr, check the data (--skip-bad), or pass --on-nan skip.")
                optimizer.zero_grad(set_to_none=True)
                skipped_in_a_row += 1
                if is_main:
                    print(f"step {step}: non-finite loss, batch skipped", flush=True)
                if skipped_in_a_row >= args.max_skips:
                    raise FloatingPointError(f"{skipped_in_a_row} non-finite losses in a row at step {step}; "
                                             "giving up (--max-skips)")
                continue
            skipped_in_a_row = 0
            if clip:
                if clip_mode == "value":
                    torch.nn.utils.clip_grad_value_(params, clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip)
            step_lr = optimizer.param_groups[0]["lr"]      # the lr this step used (logged)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if is_main and (step % args.log_every == 0 or step == total_steps):
                now = time.time()
                rate = imgs_since / max(now - t_last, 1e-9)
                t_last, imgs_since = now, 0
                rec = {"step": step, "epoch": epoch, "loss": loss_value,
                       "lr": step_lr, "img_per_s": rate,
                       **{k: float(v) for k, v in logs.items()}}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            if progress is not None:
                rate = progress.format_dict.get("rate") or 0.0          # optimizer steps per second
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}",
                                     img_s=f"{rate * batch_size * world * args.accum:.0f}", refresh=False)
                progress.update(1)
            out_of_time = args.max_minutes is not None and (time.time() - t_start) / 60 > args.max_minutes
            if world > 1:
                flag = torch.tensor([1.0 if out_of_time else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item() > 0)
            if step % args.ckpt_every == 0 or step == total_steps or out_of_time:
                save()
            if args.stop_at_step is not None and step >= args.stop_at_step:
                if is_main:
                    print(f"--stop-at-step: exiting at step {step}", flush=True)
                if world > 1:
                    dist.destroy_process_group()
                return None
            if args.eval_every and step % args.eval_every == 0 and is_main and step < total_steps:
                run_eval()
            if step >= total_steps or out_of_time:
                stop = True
                break
        else:  # the epoch ran out (not a stop): the next one starts from its first sample
            if step == steps_before and pos == 0:
                raise RuntimeError(f"epoch {epoch} produced no optimizer step ({len(sampler)} samples "
                                   f"on this rank, batch {batch_size} x accum {args.accum}); stopping "
                                   "instead of looping over empty epochs")
            epoch, pos = epoch + 1, 0
    if progress is not None:
        progress.close()
    save()
    spread = replica_spread(model, world)
    result = None
    if is_main:
        (out / "replicas.json").write_text(json.dumps({"world_size": world, "max_param_spread": spread}))
        if world > 1:
            print(f"replicas in sync: max parameter difference across {world} ranks = {spread:.3g}")
        if args.skip_bad and bad_total[1]:
            print(f"--skip-bad: {bad_total[0]} of {bad_total[1]} sample reads skipped a bad sample "
                  f"({bad_total[0] / bad_total[1]:.1%}; --max-bad {args.max_bad})", flush=True)
        result = run_eval()
        log_file.close()
        print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoint {ckpt_path}",
              flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _float32(x):
    """Floating tensors (inside dicts/lists) -> float32; the losses run outside autocast."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float32(v) for v in x)
    return x


def main(argv=None):
    """Command line. Under torchrun an error during setup (bad arguments, missing data, a
    refused resume: the same on every rank) is printed by rank 0 only; errors while training
    are printed by the rank that hits them."""
    args = parse_args(argv)
    status = {}
    try:
        return train(args, status)
    except Exception as e:  # noqa: BLE001 - printed once, then exit non-zero
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            raise
        if status.get("stage") != "training" and _rank() != 0:
            time.sleep(2)              # rank 0 prints and exits first (torchrun stops the rest)
            sys.exit(1)
        import traceback
        who = f"rank {_rank()}: " if status.get("stage") == "training" else ""
        if isinstance(e, (data_lib.DataError, FileNotFoundError, ValueError)):
            print(f"train.py: {who}error: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
