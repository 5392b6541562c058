"""Benchmarks: speed and memory as ratios measured in one run, on whatever machine runs them.

    python bench.py all                 # everything (minutes on a 2-core CPU)
    python bench.py sparse_attention    # one section: data, sparse_attention, backbones,
                                        # fastmetro_tore, deformer, featup_hmr, peers, export
    python bench.py peers --threads 1   # project / peer ratios, each with its target
    python bench.py peers --body PATH   # on another body (e.g. the Anny-derived body, SMPL)

Nothing here is a test: numbers are printed, never asserted. Peak memory on CPU is measured
with torch's CPU memory profiler (bytes allocated by tensors), reported as ratios between
variants measured in the same process.
"""
import argparse
import ctypes
import gc
import os
import statistics
import sys
import time

import torch


def timed(fn, repeats=3, warmup=1):
    """Best-of-`repeats` wall time of fn() in seconds (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _proc_status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _rss_peak(fn):
    """Peak resident set (VmHWM) above the start, after malloc_trim and a /proc reset (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_bytes("VmRSS:")
    fn()
    return _proc_status_bytes("VmHWM:") - base


def peak_memory(fn):
    """Peak bytes held by tensors that fn() allocates, measured on a call that follows an
    unprofiled warm-up call of fn (so every measurement starts from the same state).

    Why the warm-up: the CPU profiler remembers blocks allocated while an earlier profile was
    running, so a tensor kept from the previous measured call (e.g. a .grad that fn frees first)
    was reported as a negative event and the second reading of the same fn came out smaller
    (34.9 then 14.7 MiB for one dense SDPA step). After the warm-up, whatever fn frees comes from
    the unprofiled call, which the profiler never saw and does not report.
    CUDA: torch.cuda.max_memory_allocated above the starting allocation.
    CPU: the running maximum of the profiler's per-allocation "[memory]" events (exact tensor
    bytes, in time order). The per-op memory columns of the profiler are inclusive of nested ops
    and double-count, so they are not used. If the profiler API is missing, the process's peak
    resident set above the start is returned instead (coarser: includes allocator caching).
    """
    fn()                                                   # unprofiled warm-up
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError:
        return _rss_peak(fn)
    live = top = 0
    for _, nbytes in events:
        live += nbytes
        top = max(top, live)
    return top


def ab_ratio(fa, fb, rounds=5):
    """A/B timing: one warm-up call each, then `rounds` rounds of (A, B) alternated.
    Returns (median of per-round wall-time ratios A/B, median A seconds, median B seconds,
    median of per-round CPU-time ratios). The CPU-time ratio (process time: every thread of
    the process, so a peer's worker threads count) is the steadier one on a loaded machine,
    where wall time also counts the time the process waited for a core."""
    fa()
    fb()
    ta, tb, ca, cb = [], [], [], []
    for _ in range(rounds):
        for f, t, c in ((fa, ta, ca), (fb, tb, cb)):
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            t.append(time.perf_counter() - t0)
            c.append(time.process_time() - c0)
    return (statistics.median(a / b for a, b in zip(ta, tb)), statistics.median(ta),
            statistics.median(tb), statistics.median(a / max(b, 1e-9) for a, b in zip(ca, cb)))


def target_line(what, value, target, note=""):
    """One result line: 'what: value [target <= t] ok/MISSED (note)'."""
    ok = "ok" if value <= target else "MISSED"
    print(f"  {what}: {value:.3f}  [target <= {target}] {ok}" + (f"  ({note})" if note else ""),
          flush=True)


def _body(args):
    """The body model the benchmarks use: --body FILE (any body in SMPL's format, e.g. the
    Anny-derived body or SMPL itself) or the toy body."""
    from body import BodyModel
    return BodyModel(model_path=args.body)


def _body_name(args):
    return f"body file {args.body}" if args.body else "toy body (body.py)"


def _attention_meshes(args):
    """(name, faces, V, skin (V, 14), regressor (14, V)) for the body and for the same mesh with
    its vertex labels shuffled (an arbitrary-order mesh; the toy body's native order is
    unusually local)."""
    from body import H36M_TO_LSP, LSP_TO_SMPL
    bm = _body(args)
    faces, V = torch.as_tensor(bm.faces).long(), int(bm.num_vertices)
    skin = torch.as_tensor(bm.lbs_weights)[:, LSP_TO_SMPL].float()
    reg = torch.as_tensor(bm.J_regressor_h36m)[H36M_TO_LSP].float()
    new = torch.randperm(V, generator=torch.Generator().manual_seed(0))   # new label of vertex i
    old = torch.argsort(new)                                              # vertex at new label j
    return [(_body_name(args), faces, V, skin, reg),
            (_body_name(args) + ", vertex order shuffled", new[faces], V, skin[old], reg[:, old])]


def bench_data(args):
    """Synthetic generation (images/s at 224x224, JPEG + npz written) and the training loader
    (crop + FastMETRO augmentation + normalisation, DataLoader with 2 workers) in images/s.
    Targets: generation >= 30/s, loading >= 200/s.  CPU time per image is printed as well,
    since wall time on a shared machine also counts other processes."""
    import os
    import tempfile

    import data
    n_gen = 64 if args.quick else 256
    with tempfile.TemporaryDirectory() as tmp:
        data.generate_synthetic(tmp, 32, split="warmup", size=224, verbose=False)  # body build/cache
        t0, c0 = time.perf_counter(), time.process_time()
        npz = data.generate_synthetic(tmp, n_gen, split="train", seed=0, size=224, verbose=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"synthetic generation 224x224: {n_gen / wall:.1f} images/s "
              f"({n_gen} images, {wall:.2f} s wall, {1000 * cpu / n_gen:.1f} ms CPU/image, "
              f"{torch.get_num_threads()} threads)  [target >= 30]")
        ds = data.NpzDataset(npz, train=True, input_size=(224, 224), seed=0)
        epochs = 1 if args.quick else 3
        for workers in (0, 2):
            count, t0 = 0, time.perf_counter()
            for epoch in range(epochs):
                loader = data.make_loader(ds, batch_size=32, train=True, num_workers=workers,
                                          seed=0, epoch=epoch)
                for batch in loader:
                    count += batch["img"].shape[0]
            wall = time.perf_counter() - t0
            print(f"loader + augmentation 224x224, {workers} workers: {count / wall:.1f} images/s "
                  f"({count} images incl. worker start-up)  [target >= 200 with 2 workers]")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker (data.worker_init_fn)
        for size in ((224, 224), (256, 192)):
            d = data.NpzDataset(npz, train=True, input_size=size, seed=0)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(len(d)):
                d[i]
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"one sample {size[0]}x{size[1]} (decode + crop + augmentation): {1000 * cpu / len(d):.2f} ms CPU "
                  f"-> {len(d) / cpu:.0f} images/s per free core ({len(d) / wall:.0f}/s wall here)")
        torch.set_num_threads(threads)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall rates drop when the "
              f"machine is shared)")


def bench_sparse_attention(args):
    """Body sparse attention (sparse_attention.py), N = 6890 vertices + 14 joints, 8 heads,
    head dim 16 and 64, batch 2, forward+backward of the attention operator on given q, k, v
    (no projections), against (i) fused F.scaled_dot_product_attention with the (N, N) boolean
    SCAP and (ii) naive attention materialising the N x N scores.  (ii) at full size needs
    ~10 GB, so it is measured on a (1 batch, 2 heads) slice and scaled linearly by B*H/2 (its
    time and memory are linear in B*H); labelled "scaled".  Also prints tile density per
    ordering.  Peak memory: `peak_memory` (running sum of the profiler's allocation events)."""
    import torch.nn.functional as F

    import sparse_attention as sa

    peak = peak_memory
    for mesh_name, faces, V, skin, reg in _attention_meshes(args):
        print(f"\n-- mesh: {mesh_name}", flush=True)
        _sparse_attention_on(args, sa, F, peak, faces, V, skin, reg)


def _sparse_attention_on(args, sa, F, peak, faces, V, skin, reg):
    t0 = time.perf_counter()
    scap = sa.build_scap(sa.mesh_adjacency(faces, V), skin, reg)
    N, J = scap.shape[0], scap.shape[0] - V
    print(f"N = {J} joints + {V} vertices = {N} tokens; SCAP element density "
          f"{scap.float().mean().item():.4f}; built in {time.perf_counter() - t0:.2f} s", flush=True)
    print(f"{'ordering':>9} {'time s':>7} {'tiles':>7} {'density':>8} {'max/row':>8} {'median/row':>10}")
    for method in sa.ORDERINGS:
        t0 = time.perf_counter()
        perm = sa.reorder(scap, method)
        dt = time.perf_counter() - t0
        dens, counts = sa.block_density(scap, 16, perm)
        print(f"{method:>9} {dt:7.2f} {int(counts.sum()):7d} {dens:8.4f} {int(counts.max()):8d} "
              f"{float(counts.float().median()):10.1f}", flush=True)
    plans = {}
    for sem in sa.SEMANTICS:
        t0 = time.perf_counter()
        plans[sem] = sa.BlockSparsePlan(scap, 16, "rcm", sem)
        p = plans[sem]
        print(f"plan rcm/{sem}: {len(p.chunks)} chunks, {p.num_tiles} tiles, "
              f"{p.padded_slots} padded slots, built in {time.perf_counter() - t0:.2f} s")

    B, H = 2, 8
    hs = 2                                # naive slice: batch 1, hs heads
    for D in (16,) if args.quick else (16, 64):
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, N, D)
        qs, ks, vs = (t[:1, :hs].detach().clone().requires_grad_() for t in (q, k, v))
        gs = g[:1, :hs].clone()

        def naive(q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5     # (B, H, N, N)
            s = s.masked_fill(~scap, float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1), v)         # (B, H, N, D)

        def step(f, ins, grad):
            def run():
                for t in ins:
                    t.grad = None
                f(*ins).backward(grad)
            return run

        variants = [
            ("(i) sdpa+bool mask", step(lambda a, b_, c: F.scaled_dot_product_attention(
                a, b_, c, attn_mask=scap), (q, k, v), g), 1, 1),
            ("(ii) naive, scaled", step(naive, (qs, ks, vs), gs), B * H / hs, 1),
            ("block exact (rcm)", step(lambda a, b_, c: sa.block_sparse_attention(
                a, b_, c, plans["exact"]), (q, k, v), g), 1, 3),
            ("block block (rcm)", step(lambda a, b_, c: sa.block_sparse_attention(
                a, b_, c, plans["block"]), (q, k, v), g), 1, 3),
        ]
        res = {}
        for name, fn, scale, reps in variants:
            t = timed(fn, repeats=reps, warmup=1) * scale
            m = peak(fn) * scale
            res[name] = (t, m)
        # correctness of this run: block exact vs sdpa (outputs)
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=scap)
            err = (sa.block_sparse_attention(q, k, v, plans["exact"]) - ref).abs().max().item()
        t_i, m_i = res["(i) sdpa+bool mask"]
        t_ii, m_ii = res["(ii) naive, scaled"]
        print(f"\nhead dim {D}: B={B}, H={H}, N={N}, forward+backward, {torch.get_num_threads()} "
              f"threads; max |block exact - sdpa| = {err:.2e}")
        print(f"{'variant':>20} {'time s':>8} {'peak MB':>9} {'speedup vs i':>13} "
              f"{'mem / i':>8} {'mem / ii':>9}")
        for name, (t, m) in res.items():
            print(f"{name:>20} {t:8.3f} {m / 1e6:9.1f} {t_i / t:13.2f} {m / m_i:8.2f} "
                  f"{m / m_ii:9.4f}", flush=True)
        del q, k, v, g, qs, ks, vs, gs


def bench_backbones(args):
    """Parameter counts of every backbone (meta device, no memory), forward time at batch 1 for
    the ones small enough for a CPU (--quick: tiny ones and ResNet-18 only), and what ViT
    gradient checkpointing buys: peak memory and time of a training step, with / without."""
    import backbones as bb
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run = ["resnet_tiny", "hrnet_tiny", "vit_tiny", "resnet18"]
    if not args.quick:
        run += ["efficientnet_b0", "resnet50", "hrnet_w32", "vit_b"]
        if device == "cuda":
            run += ["hrnet_w48", "hrnet_w64", "vit_l", "vit_h"]
    print(f"{'backbone':16s} {'params':>9s}  {'input':>8s}  {'output':>14s}  forward b1 ({device})")
    for name in bb.BACKBONES:
        size = bb.INPUT_SIZE[name]
        with torch.device("meta"):
            m = bb.build_backbone(name).eval()
            shape = tuple(m(torch.empty(1, 3, *size)).shape[1:])
        line = f"{name:16s} {bb.count_parameters(m) / 1e6:8.2f}M  {size[0]}x{size[1]:<4d}  {str(shape):>14s}"
        if name in run:
            m = bb.build_backbone(name).eval().to(device)
            x = torch.randn(1, 3, *size, device=device)

            def fwd():
                with torch.no_grad():
                    m(x)
                sync()
            line += f"  {timed(fwd, repeats=3) * 1e3:9.1f} ms"
        else:
            line += "  (not run)"
        print(line, flush=True)
        del m

    name, batch = ("vit_tiny", 8) if args.quick else ("vit_b", 4)
    print(f"\ngradient checkpointing, {name} training step at batch {batch} (fwd + bwd):")
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *bb.INPUT_SIZE[name], device=device)
    stats = {}
    for ckpt in (False, True):
        m = bb.build_backbone(name, grad_checkpointing=ckpt, drop_path_rate=0.0).train().to(device)

        def step():
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            sync()
        # bytes autograd keeps for backward after the forward (exact, device independent);
        # the CPU profiler's peak does not see checkpointing's frees reliably, so peak memory
        # is only reported on CUDA.
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        peak = peak_memory(step) if device == "cuda" else float("nan")
        stats[ckpt] = (timed(step, repeats=2), saved[0], peak)
        peak_text = f"{peak / 2**20:8.1f} MiB" if device == "cuda" else "n/a (CUDA only)"
        print(f"  checkpointing={ckpt!s:5s}: {stats[ckpt][0] * 1e3:8.1f} ms, saved for backward "
              f"{saved[0] / 2**20:8.1f} MiB, peak {peak_text}", flush=True)
        del m
    print(f"  ratio with/without: time x{stats[True][0] / stats[False][0]:.2f}, "
          f"saved activations x{stats[True][1] / max(stats[False][1], 1):.2f}"
          + (f", peak x{stats[True][2] / stats[False][2]:.2f}" if device == "cuda" else ""))


def bench_fastmetro_tore(args):
    """FLOPs of the part after the backbone (FlopCounterMode) and images/s, FastMETRO vs TORE.

    FlopCounterMode counts 2 FLOPs per multiply-add; the papers' "GFLOPs" (fvcore-style) count one
    per multiply-add, so the comparable column is FLOPs / 2 (= GMACs). Attention uses the explicit
    matmul path while counting (CPU SDPA is not counted by FlopCounterMode). The papers' GFLOPs^T
    match transformer_1 + transformer_2 (T) truncated to 0.1: TORE's script logs those as the
    "transformer" and transformer_3 (the NSR) separately. Throughput: random-init weights,
    full model (backbone included) and the head alone, as ratios to FastMETRO in the same run.
    """
    from torch.utils.flop_counter import FlopCounterMode
    import fastmetro as fm
    import tore

    try:
        topo, topo_name = _body(args).topology(), _body_name(args)
    except Exception as e:  # noqa: BLE001 - fall back to SMPL-sized shapes only
        print(f"(body.py unavailable: {e}; using a random SMPL-sized topology)")
        g = torch.Generator().manual_seed(0)
        V = (6890, 1723, 431)
        topo = {"num_vertices": list(V), "faces": [torch.randint(0, v, (2 * v, 3), generator=g) for v in V],
                "up_index": [torch.randint(0, V[1], (V[0], 3), generator=g), torch.randint(0, V[2], (V[1], 3), generator=g)],
                "up_weight": [torch.full((V[0], 3), 1 / 3), torch.full((V[1], 3), 1 / 3)],
                "down_index": [torch.arange(V[1]), torch.arange(V[2])],
                "joint_regressor": [torch.rand(14, V[0]) / V[0]], "h36m_regressor": torch.rand(17, V[0]) / V[0]}
        topo_name = "random SMPL-sized"
    try:
        from backbones import build_backbone
        make_backbone, bb_name = (lambda: build_backbone("resnet50")), "resnet50 (random init)"
    except Exception as e:  # noqa: BLE001
        print(f"(backbones.py unavailable: {e}; using a stand-in stride-32 backbone with 2048 channels)")
        make_backbone, bb_name = (lambda: fm._StandInBackbone(2048)), "stand-in"
    print(f"topology: {topo_name} {topo['num_vertices']}, backbone: {bb_name}")

    variants = [
        ("FastMETRO-L-R50", lambda bb: fm.FastMETRO(fm.PRESETS["L-R50"], bb, topo), 6.6),
        ("TORE GTR", lambda bb: tore.TORE(tore.PRESETS["L-R50-GTR"], bb, topo), 0.7),
        ("TORE GTR+ITP@0.8", lambda bb: tore.TORE(tore.PRESETS["L-R50"], bb, topo), 0.6),
        ("TORE GTR+ITP@0.5", lambda bb: tore.TORE(tore.PRESETS["L-R50-ITP50"], bb, topo), 0.5),
    ]

    def count(fn):
        with FlopCounterMode(display=False) as fc:                       # (its module tracker fails under no_grad)
            fn()
        return fc.get_total_flops() / 2e9                                 # FLOPs / 2 = GMACs

    models = {}
    print("\nG(MAC) per image = FlopCounterMode FLOPs / 2. head = everything after the backbone;"
          "\nT = transformer_1 + transformer_2 (what TORE's script logs as 'transformer'), NSR = transformer_3.")
    print(f"{'model':18s} {'img tokens':>10s} {'head':>6s} {'T':>6s} {'NSR':>6s} {'T+NSR':>6s} {'paper GFLOPs^T':>15s}")
    for name, build, paper in variants:
        torch.manual_seed(0)
        model = build(make_backbone()).eval()
        models[name] = model
        feats = torch.randn(1, model.conv_1x1.in_channels, 7, 7)
        attn = [m for m in model.modules() if isinstance(m, fm.MultiheadAttention)]
        for m in attn:                    # this model's attention only, restored below
            m.impl = "math"
        part = {}
        try:
            total = count(lambda: model.forward_head(feats))
            for t in ("transformer_1", "transformer_2", "transformer_3"):
                mod = getattr(model, t, None)
                if mod is None:
                    continue
                orig = mod.forward

                def wrapped(*a, _orig=orig, _t=t, **k):
                    with FlopCounterMode(display=False) as c:
                        r = _orig(*a, **k)
                    part[_t] = c.get_total_flops() / 2e9
                    return r
                mod.forward = wrapped
            model.forward_head(feats)
        finally:
            for m in attn:
                m.impl = "sdpa"
            for t in ("transformer_1", "transformer_2", "transformer_3"):
                if hasattr(model, t):
                    vars(getattr(model, t)).pop("forward", None)
        T = part["transformer_1"] + part["transformer_2"]
        nsr = part.get("transformer_3", 0.0)
        ntok = getattr(model, "keep_num", 49)
        print(f"{name:18s} {ntok:10d} {total:6.2f} {T:6.2f} {nsr:6.2f} {T + nsr:6.2f} {paper:15.1f}")

    B = 8 if args.quick else 32
    print(f"\nthroughput, batch {B}, eval, no_grad, {torch.get_num_threads()} threads (best of 2 after 1 warm-up):")
    x = torch.randn(B, 3, 224, 224)
    rates = {}
    for name, model in models.items():
        feats = torch.randn(B, model.conv_1x1.in_channels, 7, 7)
        with torch.no_grad():
            t_full = timed(lambda: model(x), repeats=2, warmup=1)
            t_head = timed(lambda: model.forward_head(feats), repeats=2, warmup=1)
        rates[name] = (B / t_full, B / t_head)
    base_full, base_head = rates["FastMETRO-L-R50"]
    print(f"{'model':18s} {'full img/s':>10s} {'vs FM':>7s} {'head-only img/s':>16s} {'vs FM':>7s}")
    for name, (full, head) in rates.items():
        print(f"{name:18s} {full:10.1f} {full / base_full - 1:+7.1%} {head:16.1f} {head / base_head - 1:+7.1%}")
    print("paper (RTX 3090, batch 32, R50): FM 576.0 im/s; +GTR 805.3 (+39.8%); +GTR+ITP@20% 794.7; @50% 806.1")


def bench_deformer(args):
    """DeFormer (deformer.py): one training step (forward + loss + backward) of the dense-query
    variant (PRESETS["dense"]: 431 -> 1723 -> 6890 vertex queries + 14 joints = 6904 tokens in
    the last stage, width 256) at batch 2 on the toy body, with the Body Sparse self-attention
    run as impl "block" (block-sparse) vs "dense" (fused masked SDPA) vs "naive" (N x N scores).
    Backbone: hrnet_tiny (the same for every impl; the paper's HRNet-W48 only adds a constant),
    dropout 0. Naive at 8 heads needs ~(blocks at 6890 + 3) x B x H x N^2 x 4 bytes (~15 GB), more
    than this shared machine can give, so all three impls are also measured at the largest head
    count whose naive estimate fits in --naive-gb (default 4) and the ratios are
    printed per head count. Also prints the parameter count of the paper-default model
    (HRNet-W48 + decoder on the toy body). Peak memory: running sum of the profiler's
    per-allocation events (as in bench_sparse_attention)."""
    import dataclasses

    from backbones import build_backbone
    from deformer import PRESETS, DeFormer

    peak = peak_memory

    topo = _body(args).topology()
    V0, J, B = topo["num_vertices"][0], topo["joint_regressor"][0].shape[0], 2
    N = V0 + J
    cfg = dataclasses.replace(PRESETS["dense"], backbone="hrnet_tiny", dropout=0.0)
    if args.quick:
        cfg = dataclasses.replace(cfg, blocks_per_level=(1, 1, 1))
    n0 = cfg.blocks_per_level[cfg.mesh_levels.index(0)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, *cfg.input_size, generator=g)
    ones = torch.ones(B, J, 1)
    tg = {"joints3d": torch.cat([0.2 * torch.randn(B, J, 3, generator=g), ones], -1),
          "joints2d": torch.cat([2 * torch.rand(B, J, 2, generator=g) - 1, ones], -1),
          "vertices": 0.2 * torch.randn(B, V0, 3, generator=g),
          "has_smpl": torch.ones(B), "has_3d": torch.ones(B)}
    limit = args.naive_gb * 2 ** 30
    est = lambda h: (n0 + 3) * B * h * N * N * 4
    heads_fit = [h for h in (8, 4, 2, 1) if est(h) <= limit]
    print(f"dense-query variant: {N} tokens in the 6890 stage ({n0} blocks), batch {B}, width "
          f"{cfg.dim}, blocks {cfg.blocks_per_level}, backbone {cfg.backbone}; naive estimate at "
          f"8 heads {est(8) / 2**30:.1f} GB (limit {limit / 2**30:.0f} GB)", flush=True)
    all_res = {}
    for heads in sorted({cfg.num_heads, *heads_fit[:1]}, reverse=True):
        impls = ["block", "dense"] + (["naive"] if est(heads) <= limit else [])
        res = all_res[heads] = {}
        for impl in impls:
            torch.manual_seed(0)
            m = DeFormer(dataclasses.replace(cfg, attn_impl=impl, num_heads=heads),
                         build_backbone(cfg.backbone), topo)

            def step():
                loss, _ = m.loss(m(x), tg)
                loss.backward()
                m.zero_grad(set_to_none=True)
            t = timed(step, repeats=1, warmup=1)
            mem = peak(step)
            res[impl] = (t, mem)
            print(f"  heads {heads} (head dim {cfg.dim // heads}) {impl:6s}: step {t:7.2f} s, "
                  f"peak {mem / 2**20:8.1f} MB", flush=True)
            del m
            gc.collect()
        tb, mb = res["block"]
        for impl in impls[1:]:
            t, mem = res[impl]
            print(f"  heads {heads}: block vs {impl}: {t / tb:.2f}x faster, memory "
                  f"{mb / mem:.3f} of {impl}", flush=True)
    H = cfg.num_heads
    if "naive" not in all_res[H] and heads_fit:
        h = heads_fit[0]
        # naive's extra memory over fused SDPA is its (B, H, N, N) buffers: linear in H.
        extra = all_res[h]["naive"][1] - all_res[h]["dense"][1]
        naive_est = all_res[H]["dense"][1] + extra * H / h
        print(f"  heads {H}: naive peak estimated from heads {h} (extra over dense x {H // h}): "
              f"{naive_est / 2**20:.0f} MB; block memory = {all_res[H]['block'][1] / naive_est:.3f} "
              f"of naive (estimate)", flush=True)
    paper = PRESETS["paper"]
    bb = build_backbone(paper.backbone)
    m = DeFormer(paper, bb, topo)
    n_all = sum(p.numel() for p in m.parameters())
    n_bb = sum(p.numel() for p in bb.parameters())
    dense_extra = sum(p.numel() for p in DeFormer(PRESETS["dense"], bb, topo).parameters()) - n_all
    print(f"paper-default DeFormer ({paper.backbone}, toy body {topo['num_vertices']}): "
          f"{n_all / 1e6:.2f} M parameters = backbone {n_bb / 1e6:.2f} M + decoder "
          f"{(n_all - n_bb) / 1e6:.2f} M; dense-query preset: {dense_extra / 1e6:+.2f} M")


def bench_featup_hmr(args):
    """featup_hmr.py: parameter counts (ViT-H/B on the meta device, vs the report's 714M), the
    tiny preset's variants (forward and train-step time, peak memory, as ratios to bilinear),
    and JBU upsampler timings per factor and window size."""
    import dataclasses
    import featup_hmr as fh
    try:
        from backbones import build_backbone
    except Exception:                                               # noqa: BLE001
        build_backbone = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    count = lambda m: sum(p.numel() for p in m.parameters())

    print("-- parameter counts (meta device; report: 714M FeatUp x4, 713M bilinear, HMR 2.0 725M)")
    for preset in ("vit_h", "vit_h_bilinear", "vit_h_x16", "vit_h_dense", "vit_b"):
        cfg = fh.PRESETS[preset]
        with torch.device("meta"):
            if build_backbone is not None:
                vit = build_backbone(cfg.backbone, **cfg.backbone_kwargs)
            else:
                dims = {"vit_h": (1280, 32, 16), "vit_b": (768, 12, 12)}[cfg.backbone]
                vit = fh._StandInViT(*dims, out_indices=cfg.out_indices)
            model = fh.FeatUpHMR(cfg, vit, None, fh._StandInBody(16))
        bb = count(model.backbone)
        print(f"  {preset:15s} total {count(model) / 1e6:7.1f}M  ViT {bb / 1e6:6.1f}M  head "
              f"{(count(model) - bb) / 1e6:5.1f}M  upsamplers {count(model.upsamplers) / 1e6:.2f}M")

    B = 2 if args.quick else 8
    H, W = fh.PRESETS["tiny"].input_size
    x = torch.randn(B, 3, H, W, device=dev)
    body = fh._StandInBody(431 if args.quick else 6890).to(dev)
    V = body.num_vertices
    g = torch.Generator().manual_seed(0)
    pose = torch.randn(B, 72, generator=g) * 0.2
    targets = {"joints3d": torch.rand(B, 14, 4), "joints2d": torch.rand(B, 14, 3), "pose": pose,
               "betas": torch.randn(B, 10, generator=g), "has_smpl": torch.ones(B),
               "has_3d": torch.ones(B), "vertices": torch.randn(B, V, 3, generator=g)}
    targets = {k: v.to(dev) for k, v in targets.items()}
    variants = [("bilinear x2", {"upsampler": "bilinear"}), ("FeatUp x2 7x7 (tiny)", {}),
                ("FeatUp x2 3x3", {"jbu_radius": 1}),
                ("bilinear x4", {"upsampler": "bilinear", "upsample_factor": 4}),
                ("FeatUp x4 3x3", {"upsample_factor": 4, "jbu_radius": 1}),
                ("FeatUp x4 7x7", {"upsample_factor": 4}),
                ("native only, deformable", {"upsampler": "none"}),
                ("native only, dense (HMR2)", {"upsampler": "none", "decoder": "dense"}),
                ("bilinear x2, dense", {"upsampler": "bilinear", "decoder": "dense"})]
    if not args.quick:
        variants.append(("FeatUp x8 7x7", {"upsample_factor": 8}))
    print(f"-- tiny preset variants, batch {B}, {H}x{W}, stand-in body V={V}, {dev}"
          f" ({'backbones.vit_tiny' if build_backbone else 'inline stand-in ViT'})")
    base = None
    for name, over in variants:
        cfg = dataclasses.replace(fh.PRESETS["tiny"], **over)
        torch.manual_seed(0)
        vit = (build_backbone(cfg.backbone, **cfg.backbone_kwargs) if build_backbone
               else fh._StandInViT(64, 4, 4, out_indices=cfg.out_indices))
        model = fh.FeatUpHMR(cfg, vit, None, body).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            loss, _ = model.loss(model(x), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def fwd():
            with torch.no_grad():
                model(x)

        model.train()
        t_step = timed(step, repeats=2 if args.quick else 3)
        mem = peak_memory(step)
        model.eval()
        t_fwd = timed(fwd, repeats=2 if args.quick else 3)
        S = sum(h * w for h, w in (t.shape[-2:] for t in model.feature_levels(x[:1])))
        if base is None:
            base = (t_fwd, t_step, mem)
        print(f"  {name:26s} head {(count(model) - count(vit)) / 1e3:6.1f}k  tokens {S:5d}  fwd "
              f"{t_fwd * 1e3:7.1f} ms ({t_fwd / base[0]:4.2f}x)  train step {t_step * 1e3:7.1f} ms "
              f"({t_step / base[1]:4.2f}x)  peak mem {mem / 2 ** 20:7.1f} MiB ({mem / max(base[2], 1):4.2f}x)")

    print("-- JBU upsampler alone: C=64 features 16x12 -> x factor, batch "
          f"{B}, forward (no grad); ratio to bilinear of the same factor")
    factors = (4, 8) if args.quick else (4, 8, 16)
    f = torch.randn(B, 64, 16, 12, device=dev)
    for factor in factors:
        img = torch.randn(B, 3, 16 * factor, 12 * factor, device=dev)
        bil = fh.BilinearUpsampler(factor)
        t_b = timed(lambda: bil(f, img), repeats=3)
        for radius in (1, 3):
            up = fh.JBUStack(64, factor, 32, radius).to(dev).eval()
            with torch.no_grad():
                t_j = timed(lambda: up(f, img), repeats=2)
            f_g = f.clone().requires_grad_()
            t_jb = timed(lambda: up(f_g, img).square().sum().backward(), repeats=2)
            print(f"  x{factor:<2d} {2 * radius + 1}x{2 * radius + 1}  JBU fwd {t_j * 1e3:8.1f} ms "
                  f"({t_j / t_b:6.1f}x bilinear)  fwd+bwd {t_jb * 1e3:8.1f} ms")


def _torch_mha_peer(model):
    """A copy of a FastMETRO model whose attention modules are torch.nn.MultiheadAttention
    called the way the official FastMETRO transformer calls them (sequence-first, default
    need_weights=True, boolean attn_mask), with the same weights, and whose dropout layers are
    torch.nn.Dropout, as the official layers' (fastmetro.Dropout draws its CPU mask more cheaply).
    Everything else (layer order, norms, FFN, heads of the model) is shared, so the ratio
    isolates attention and dropout."""
    import copy

    import fastmetro as fm
    from torch import nn

    class SeqFirstMHA(nn.MultiheadAttention):
        def forward(self, query, key, value, attn_mask=None):      # (B, L, C) in and out
            return super().forward(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                   attn_mask=attn_mask)[0].transpose(0, 1)

    peer = copy.deepcopy(model)
    for mod in list(peer.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, fm.MultiheadAttention):
                t = SeqFirstMHA(child.embed_dim, child.num_heads, dropout=child.dropout)
                t.load_state_dict(child.state_dict())
                setattr(mod, name, t)
            elif isinstance(child, fm.Dropout):
                setattr(mod, name, nn.Dropout(child.p))
    return peer


def _peers_fastmetro(args):
    import fastmetro as fm
    topo = _body(args).topology()
    B = 4 if args.quick else args.fastmetro_batch
    presets = ("S-R50",) if args.quick else ("S-R50", "L-R50")
    print(f"FastMETRO head (everything after the backbone, 2048 x 7 x 7 features), batch {B}, "
          f"{_body_name(args)}; peer = the same model with torch.nn.MultiheadAttention called as "
          f"the official code calls it (sequence-first, need_weights=True)", flush=True)
    for preset in presets:
        torch.manual_seed(0)
        ours = fm.FastMETRO(fm.PRESETS[preset], fm._StandInBackbone(2048), topo)
        peer = _torch_mha_peer(ours)
        feats = torch.randn(B, 2048, 7, 7)

        def evaluate(m):
            def run():
                with torch.no_grad():
                    m.forward_head(feats)
            return run

        def train(m):
            def run():
                m.zero_grad(set_to_none=True)
                out = m.forward_head(feats)
                sum(v.float().square().mean() for v in out.values()
                    if torch.is_tensor(v) and v.requires_grad).backward()
            return run
        ours.eval(), peer.eval()
        r, ta, tb, rc = ab_ratio(evaluate(ours), evaluate(peer), args.rounds)
        target_line(f"FastMETRO-{preset} eval forward / peer", r, 1.0, f"{ta:.2f} s vs {tb:.2f} s; CPU-time ratio {rc:.3f}")
        ours.train(), peer.train()
        r, ta, tb, rc = ab_ratio(train(ours), train(peer), args.rounds)
        target_line(f"FastMETRO-{preset} train forward+backward (dropout "
                    f"{fm.PRESETS[preset].dropout}) / peer", r, 0.9,
                    f"{ta:.2f} s vs {tb:.2f} s; CPU-time ratio {rc:.3f}")
        del ours, peer


def _peers_sparse_attention(args):
    import torch.nn.functional as F

    import sparse_attention as sa
    B, H, D = 1, 8, 32                     # DeFormer's width 256 / 8 heads, batch 1
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except Exception as e:                 # noqa: BLE001 - optional peer
        flex, flex_err = None, f"{type(e).__name__}: {e}"
    for mesh_name, faces, V, skin, reg in _attention_meshes(args)[: 1 if args.quick else 2]:
        scap = sa.build_scap(sa.mesh_adjacency(faces, V), skin, reg)
        N = scap.shape[0]
        plan = sa.BlockSparsePlan(scap, 16, "rcm", "exact")
        print(f"body-sparse attention, {mesh_name}: N = {N}, B={B}, H={H}, head dim {D}, rcm "
              f"tile density {plan.density:.4f}", flush=True)
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, N, D)

        def step(f):
            def run():
                for t in (q, k, v):
                    t.grad = None
                f(q, k, v).backward(g)
            return run

        def fwd(f, *ins):
            def run():
                with torch.no_grad():
                    f(*(ins or (q, k, v)))
            return run
        block = lambda a, b, c: sa.block_sparse_attention(a, b, c, plan)          # noqa: E731
        masked = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=scap)  # noqa: E731
        dense = lambda a, b, c: F.scaled_dot_product_attention(a, b, c)           # noqa: E731
        r, ta, tb, rc = ab_ratio(step(block), step(masked), args.rounds)
        target_line("fwd+bwd time / SDPA with the boolean mask", r, 1.0,
                    f"{ta:.3f} s vs {tb:.3f} s; CPU-time ratio {rc:.3f}")
        if flex is None:
            print(f"  FlexAttention: skipped ({flex_err})")
        else:
            try:
                mp = scap[plan.perm][:, plan.perm]   # Flex gets the same RCM order as the kernel
                bm = create_block_mask(lambda b, h, i, j: mp[i, j], None, None, N, N, device="cpu")
                qp, kp, vp = (t.detach()[:, :, plan.perm].contiguous() for t in (q, k, v))
                t0 = time.perf_counter()
                fwd(lambda a, b, c: flex(a, b, c, block_mask=bm), qp, kp, vp)()
                compile_s = time.perf_counter() - t0
                r, ta, tb, rc = ab_ratio(fwd(block), fwd(lambda a, b, c: flex(a, b, c, block_mask=bm),
                                                     qp, kp, vp), args.rounds)
                target_line("forward time / compiled FlexAttention (BlockMask of the same pattern, "
                            "RCM order)", r, 1.0, f"{ta:.3f} s vs {tb:.3f} s; CPU-time ratio {rc:.3f}; compiled in "
                            f"{compile_s:.0f} s; FlexAttention has no CPU backward, so fwd only")
            except Exception as e:         # noqa: BLE001 - optional peer
                print(f"  FlexAttention: skipped ({type(e).__name__}: {str(e)[:200]})")
        m_fwd = peak_memory(fwd(block)) / peak_memory(fwd(dense))
        target_line("peak memory forward / dense unmasked SDPA", m_fwd, 1.5)
        m_step = peak_memory(step(block)) / peak_memory(step(dense))
        target_line("peak memory forward+backward / dense unmasked SDPA", m_step, 1.5)
        del q, k, v, g


def _peers_render(args):
    import render
    bm = _body(args)
    faces = torch.as_tensor(bm.faces).long()
    v = torch.as_tensor(bm.v_template).float()
    v = v - v.mean(0) + torch.tensor([0.0, 0.0, 2.5])           # (V, 3), in front of the camera
    # Headless: pyrender's default platform (pyglet) needs a display; EGL (Mesa's llvmpipe
    # software rasteriser, no GPU needed) or OSMesa do not. llvmpipe gets as many rasteriser
    # threads as torch has, so both sides use the same cores. A user's own settings win.
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    os.environ.setdefault("LP_NUM_THREADS", str(torch.get_num_threads()))
    try:
        import pyrender
        import trimesh
    except Exception as e:                 # noqa: BLE001 - optional peer, never a dependency
        pyrender = None
        why = (f"not installed ({type(e).__name__}: {e}); it is an optional peer, never a "
               "requirement: e.g. python3 -m venv --system-site-packages .gl/venv && "
               ".gl/venv/bin/pip install pyrender, then run bench.py with .gl/venv/bin/python")
    else:
        print(f"  pyrender {pyrender.__version__}, platform "
              f"{os.environ.get('PYOPENGL_PLATFORM', 'default (pyglet)')}, LP_NUM_THREADS "
              f"{os.environ.get('LP_NUM_THREADS')}; both sides cull back faces (pyrender's default "
              f"for a single-sided mesh; same image for a closed mesh)", flush=True)
    for size in (224, 1024):
        focal = 1.1 * size
        ours = lambda: render.render(v[None], faces, focal, None, (size, size),  # noqa: E731
                                     cull_backfaces=True)
        if pyrender is None:
            r, ta, _, _ = ab_ratio(ours, lambda: None, args.rounds)
            print(f"  rasteriser {size}x{size}, one {v.shape[0]}-vertex mesh: {ta * 1e3:.1f} ms; "
                  f"pyrender peer skipped: {why}", flush=True)
            continue
        try:
            scene = pyrender.Scene(ambient_light=[0.45] * 3)
            mesh = trimesh.Trimesh(v.numpy() * [1, -1, -1], faces.numpy(), process=False)  # GL: y up, -z
            scene.add(pyrender.Mesh.from_trimesh(mesh, smooth=True))
            scene.add(pyrender.IntrinsicsCamera(focal, focal, size / 2, size / 2))
            scene.add(pyrender.DirectionalLight(intensity=3.0))
            gl = pyrender.OffscreenRenderer(size, size)
            r, ta, tb, rc = ab_ratio(ours, lambda: gl.render(scene), args.rounds)
            target_line(f"rasteriser + shading {size}x{size} / pyrender", r, 1.0,
                        f"{ta * 1e3:.1f} ms vs {tb * 1e3:.1f} ms; CPU-time ratio {rc:.3f}")
            gl.delete()
        except Exception as e:             # noqa: BLE001 - e.g. no EGL/OSMesa library here
            print(f"  pyrender {size}x{size}: skipped, it cannot render headless here "
                  f"({type(e).__name__}: {str(e)[:200]}; needs an EGL or OSMesa library, "
                  f"PYOPENGL_PLATFORM=egl or osmesa)", flush=True)


def bench_peers(args):
    """The project against the peers importable here, as ratios project / peer (below 1 = the
    project is faster), each round timing A then B on the same inputs; medians of per-round
    ratios over --rounds rounds. Peers: FlexAttention (torch.compile on CPU, forward only: it
    has no CPU backward) and F.scaled_dot_product_attention for the body-sparse attention;
    torch.nn.MultiheadAttention (called as the official FastMETRO code calls it) for the FastMETRO
    transformer; pyrender for the rasteriser, only if the user has installed it (it is never a
    dependency; otherwise a 'skipped' line). Deformable DETR's MSDeformAttn needs its repository
    and CUDA extension, so it is not measured here."""
    print(f"threads {torch.get_num_threads()}; rounds {args.rounds}", flush=True)
    print("-- body-sparse attention (sparse_attention.py)")
    _peers_sparse_attention(args)
    print("-- rasteriser (render.py)")
    _peers_render(args)
    print("-- MSDeformAttn vs Deformable DETR's: skipped (their module needs the Deformable DETR "
          "repository and its CUDA extension)")
    print("-- FastMETRO transformer (fastmetro.py)")
    _peers_fastmetro(args)


def bench_export(args):
    """export.py: eager vs torch.export program images/s for each model's tiny preset (toy body,
    random init), same inputs, same process; --quick: FastMETRO and TORE only."""
    import export
    names = ("fastmetro", "tore") if args.quick else ("fastmetro", "tore", "deformer", "featup_hmr")
    batch = 4
    for name in names:
        meta = {"model": name, "preset": "tiny", "set": [], "seed": 0}
        model, _ = export.build_from_spec(meta)
        t0 = time.perf_counter()
        prog = export.export_program(model, name, max_batch=64).module()
        t_export = time.perf_counter() - t0
        H, W = export.input_size_of(model)
        x = torch.randn(batch, 3, H, W)
        eager = export.InferenceOutputs(model).eval()
        e = export.images_per_second(eager, x)
        p = export.images_per_second(prog, x)
        print(f"  {name:<10} tiny {H}x{W} batch {batch}: eager {e:7.2f} img/s, exported {p:7.2f} "
              f"img/s (exported/eager {p / e:.2f}); export took {t_export:.0f} s", flush=True)


SECTIONS = {
    "data": bench_data,
    "sparse_attention": bench_sparse_attention,
    "backbones": bench_backbones,
    "fastmetro_tore": bench_fastmetro_tore,
    "deformer": bench_deformer,
    "featup_hmr": bench_featup_hmr,
    "peers": bench_peers,
    "export": bench_export,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
    parser.add_argument("--body", default=None, help="body model file or folder (SMPL format, "
                        "e.g. the Anny-derived body or SMPL); default: the toy body")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds per ratio (peers)")
    parser.add_argument("--fastmetro-batch", type=int, default=16, help="batch of the FastMETRO peers")
    parser.add_argument("--naive-gb", type=float, default=4.0, help="deformer: memory cap (GB) "
                        "for the naive-attention variant; head counts whose estimate exceeds it "
                        "are skipped")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}", flush=True)
    for name, fn in SECTIONS.items():
        if args.section in (name, "all"):
            print(f"\n== {name} ==", flush=True)
            fn(args)
    sys.exit(0)
