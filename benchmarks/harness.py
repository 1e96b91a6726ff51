"""Shared benchmark harness: device, timing, peak memory and the hardware floors.

Each benchmark records, in pytest-benchmark's extra_info, the sizes, the work (bytes or
flops), the peak extra memory and, on CUDA, a device-side median time taken with CUDA
events (triton.testing.do_bench), so report.py can turn the JSON into a table.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def device_ms(fn, warmup=25, rep=100) -> float | None:
    """Median device time of fn in ms with CUDA events; None on CPU."""
    if not CUDA:
        return None
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def wall_ms(fn, repeat=5) -> float:
    """Median wall time in ms (synchronised), for CPU figures outside pytest-benchmark."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn) -> int:
    """Peak memory fn allocates beyond what is live when it starts.

    CUDA: the caching allocator's peak. CPU: peak resident set during fn minus the
    resident set before it (freed memory that malloc keeps cached can hide some).
    """
    if CUDA:
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    # CPU: reset the kernel's peak-RSS mark (clear_refs 5), run, read VmHWM. Forking
    # would be cleaner but deadlocks torch's OpenMP pool in the child.
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kb("VmRSS")
    fn()
    return max(_status_kb("VmHWM") - rss0, 0) * 1024


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def copy_bandwidth_gbs(n_bytes=None) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    n_bytes = n_bytes or (2 << 30 if CUDA else 256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src)) if CUDA else wall_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(n=None, dtype=None) -> float:
    n = n or (8192 if CUDA else 1024)
    dtype = dtype or (torch.bfloat16 if CUDA else torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = device_ms(lambda: a @ b) if CUDA else wall_ms(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def empty_launch_us() -> float | None:
    """Device time of one empty Triton kernel launch (CUDA only)."""
    if not CUDA:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(x_ptr):
        pass

    x = torch.empty(1, device=DEVICE)
    return device_ms(lambda: _empty[(1,)](x)) * 1e3


def record(benchmark, **info):
    benchmark.extra_info.update({"device": device_name(), **info})
