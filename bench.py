"""Benchmarks: speed and memory as ratios measured in one run, on whatever machine runs them.

    python bench.py all                 # everything (minutes on a 2-core CPU)
    python bench.py sparse_attention    # one section: data, sparse_attention, backbones,
                                        # fastmetro_tore, deformer, featup_hmr

Nothing here is a test: numbers are printed, never asserted. Peak memory on CPU is measured
with torch's CPU memory profiler (bytes allocated by tensors), reported as ratios between
variants measured in the same process.
"""
import argparse
import ctypes
import gc
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


def peak_memory(fn):
    """Peak bytes fn() adds while it runs.

    CUDA: torch.cuda.max_memory_allocated above the starting allocation.
    CPU (Linux): the process's peak resident set (VmHWM) above its resident set at the start,
    after returning freed heap memory to the OS (malloc_trim) and resetting the peak through
    /proc/self/clear_refs. The profiler's per-op memory figures count nested ops twice, so they
    are not used. Call it once to warm up (first calls pay for one-time allocations).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_bytes("VmRSS:")
    fn()
    return _proc_status_bytes("VmHWM:") - base


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
    ordering.  Peak memory: exact running sum of the profiler's per-allocation events (the
    module-level `peak_memory` helper sums nested op totals, which double-counts)."""
    import torch.nn.functional as F

    import sparse_attention as sa

    def peak(fn):
        gc.collect()
        if torch.cuda.is_available():
            return peak_memory(fn)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        try:
            evs = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
        except AttributeError:          # older/newer profiler API: fall back to the helper
            return peak_memory(fn)
        live = top = 0
        for _, nbytes in evs:
            live += nbytes
            top = max(top, live)
        return top

    try:
        from body import H36M_TO_LSP, LSP_TO_SMPL, BodyModel
        bm = BodyModel()
        faces, V = bm.faces, int(bm.num_vertices)
        skin = bm.lbs_weights[:, LSP_TO_SMPL]
        reg = bm.J_regressor_h36m[H36M_TO_LSP]
        src = "toy body (body.BodyModel)"
    except Exception as e:  # body.py missing or failing: synthetic SMPL-sized mesh
        b = sa.synthetic_body(rings=40, segments=24) if args.quick else sa.synthetic_body()
        faces, V, skin, reg = b["faces"], b["num_vertices"], b["skin_weights"], b["joint_regressor"]
        src = f"synthetic torus, shuffled labels (body.py unavailable: {type(e).__name__}: {e})"
    t0 = time.perf_counter()
    scap = sa.build_scap(sa.mesh_adjacency(faces, V), skin, reg)
    N, J = scap.shape[0], scap.shape[0] - V
    print(f"mesh: {src}\nN = {J} joints + {V} vertices = {N} tokens; SCAP element density "
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
    for D in (16, 64):
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
                a, b_, c, attn_mask=scap), (q, k, v), g), 1, 2),
            ("(ii) naive, scaled", step(naive, (qs, ks, vs), gs), B * H / hs, 2),
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
        print(f"  checkpointing={ckpt!s:5s}: {stats[ckpt][0] * 1e3:8.1f} ms, saved for backward "
              f"{saved[0] / 2**20:8.1f} MiB, peak {peak / 2**20:8.1f} MiB", flush=True)
        del m
    print(f"  ratio with/without: time x{stats[True][0] / stats[False][0]:.2f}, "
          f"saved activations x{stats[True][1] / max(stats[False][1], 1):.2f}, "
          f"peak x{stats[True][2] / stats[False][2]:.2f}")


def bench_fastmetro_tore(args):
    raise NotImplementedError("bench_fastmetro_tore: filled in with fastmetro.py/tore.py")


def bench_deformer(args):
    raise NotImplementedError("bench_deformer: filled in with deformer.py")


def bench_featup_hmr(args):
    raise NotImplementedError("bench_featup_hmr: filled in with featup_hmr.py")


SECTIONS = {
    "data": bench_data,
    "sparse_attention": bench_sparse_attention,
    "backbones": bench_backbones,
    "fastmetro_tore": bench_fastmetro_tore,
    "deformer": bench_deformer,
    "featup_hmr": bench_featup_hmr,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
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
