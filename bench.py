"""Benchmarks: speed and memory as ratios measured in one run, on whatever machine runs them.

    python bench.py all                 # everything (minutes on a 2-core CPU)
    python bench.py sparse_attention    # one section: data, sparse_attention, backbones,
                                        # fastmetro_tore, deformer, featup_hmr

Nothing here is a test: numbers are printed, never asserted. Peak memory on CPU is measured
with torch's CPU memory profiler (bytes allocated by tensors), reported as ratios between
variants measured in the same process.
"""
import argparse
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


def peak_memory(fn):
    """Peak bytes held by tensors while fn() runs (CPU: profiler; CUDA: max_memory_allocated)."""
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
    # Walk allocation events in order and keep the running maximum of live bytes.
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def bench_data(args):
    raise NotImplementedError("bench_data: filled in by the data pipeline")


def bench_sparse_attention(args):
    raise NotImplementedError("bench_sparse_attention: filled in with sparse_attention.py")


def bench_backbones(args):
    raise NotImplementedError("bench_backbones: filled in with backbones.py")


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
