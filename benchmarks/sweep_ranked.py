"""Ranked-loss kernel on CUDA: where the time goes, a tile sweep, and host (eager) cost.

    python benchmarks/sweep_ranked.py            # from benchmarks/ (imports bench_ranked_loss)
    RANKED_PREV=path/to/old/ranked_loss.py python sweep_ranked.py   # also time an older version

1. Breakdown under CUDA-graph replay (kernel time, no Python): the whole fwd+bwd step,
   the forward launch with and without the gradient, the backward launch alone, the
   grad-seed fill autograd adds, an empty launch.
2. Sweep of TILE_PAIRS x NUM_WARPS, then MAX_PROGRAMS, fwd+bwd under graph replay, each
   setting checked against the float64 reference; other group-size mixes.
3. Host cost per eager call (wall clock over back-to-back calls, synchronised at the
   end): what users pay per step at this size.
"""
import importlib.util
import inspect
import itertools
import os
import sys
import time

import torch
import triton
import triton.testing

import rankpm.kernels.ranked_loss as rl
from bench_ranked_loss import G, K, make_batch

DEV = "cuda"
scores, ranks, offsets = make_batch()
x = scores.detach().requires_grad_()
ranks32 = ranks.to(torch.int32)
S = G * K
PARAMS = rl.RankedLossParams()


def graph_us(fn, rep=60):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def host_us(fn, n=200, repeats=3):
    """Wall time per call, back to back, one sync at the end (the eager step rate); the
    best of a few repeats, since the host is shared and noisy."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def step_of(mod, r=ranks):
    def step():
        x.grad = None
        mod.ranked_preference_loss(x, r, offsets, impl="triton").loss.backward()
    return step


@triton.jit
def _empty(x_ptr):
    pass


def breakdown(mod, name):
    xd = x.detach()
    go = torch.ones((), device=DEV)
    params = PARAMS if hasattr(mod, "_tiling") else mod.RankedLossParams()
    # optional tensors (margin, [levels,] weights) between offsets and params: None for each
    n_optional = len(inspect.signature(mod._launch_forward).parameters) - 5

    def forward(grad):
        return mod._launch_forward(xd, ranks, offsets, *[None] * n_optional, params, grad)

    if hasattr(mod, "_tiling"):  # this version
        loss, stats, graw = forward(True)
        bwd = lambda: mod._launch_backward(graw, stats, go, torch.float32)  # noqa: E731
    else:  # the previous version: graw + per-group factor, grouped backward
        loss, stats, graw, factor = forward(True)
        bwd = lambda: mod._launch_backward(graw, factor, offsets, stats, go, torch.float32)  # noqa: E731
    rows = {
        "fwd+bwd step": graph_us(step_of(mod)),
        "fwd+bwd step, int32 ranks": graph_us(step_of(mod, ranks32)),
        "forward launch (with grad)": graph_us(lambda: forward(True)),
        "forward launch (no grad)": graph_us(lambda: forward(False)),
        "backward launch": graph_us(bwd),
        "grad seed fill (autograd)": graph_us(lambda: torch.ones_like(loss)),
        "empty launch": graph_us(lambda: _empty[(1,)](xd)),
    }
    for k, v in rows.items():
        print(f"[{name}] {k:30s} {v:7.1f} us")
    return rows


def max_err(mod=rl):
    """Relative errors of loss and gradient against the float64 reference on the batch."""
    xr = x.detach().double().requires_grad_()
    ref = rl.ranked_preference_loss_reference(xr, ranks, offsets)
    ref.loss.backward()
    x.grad = None
    out = mod.ranked_preference_loss(x, ranks, offsets, impl="triton")
    out.loss.backward()
    el = float((out.loss.double() - ref.loss).abs() / ref.loss.abs())
    eg = float((x.grad.double() - xr.grad).norm() / xr.grad.norm())
    return max(el, eg)


def sweep():
    rows = []
    step = step_of(rl)
    for tile, nw in [(512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 8)]:
        rl.TILE_PAIRS, rl.NUM_WARPS = tile, nw
        us = graph_us(step, rep=40)
        rows.append((us, tile, nw))
        print(f"TILE_PAIRS={tile:5d} num_warps={nw}: {us:6.1f} us  (rel err {max_err():.1e})")
    _, rl.TILE_PAIRS, rl.NUM_WARPS = min(rows)
    best_p = None
    for mp in [256, 384, 512, 768, 1024, 2048]:
        rl.MAX_PROGRAMS = mp
        us = graph_us(step, rep=40)
        print(f"  MAX_PROGRAMS={mp:5d}: {us:6.1f} us  (rel err {max_err():.1e})")
        best_p = min(best_p or (us, mp), (us, mp))
    rl.MAX_PROGRAMS = best_p[1]
    best = dict(TILE_PAIRS=rl.TILE_PAIRS, NUM_WARPS=rl.NUM_WARPS, MAX_PROGRAMS=rl.MAX_PROGRAMS)
    print("best:", best, f"{best_p[0]:.1f} us")
    return best


def other_mixes():
    """Same number of responses, other group-size mixes (at the current setting)."""
    g = torch.Generator().manual_seed(0)
    for kmin, kmax in [(2, 2), (4, 4), (2, 16), (2, 64)]:
        sizes = torch.randint(kmin, kmax + 1, (S // ((kmin + kmax) // 2),), generator=g)
        off = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(DEV)
        n = int(off[-1])
        xs = torch.randn(n, device=DEV, requires_grad=True)
        rk = torch.randint(0, kmax, (n,), device=DEV)

        def step():
            xs.grad = None
            rl.ranked_preference_loss(xs, rk, off, impl="triton").loss.backward()
        print(f"  sizes {kmin}..{kmax}: G={sizes.numel()}, S={n}: {graph_us(step):6.1f} us")


def host_costs(mods):
    xd = x.detach()
    a = torch.randn(4, device=DEV)
    rows = {
        "torch op (a + 1)": lambda: a + 1,
        "torch.empty(S)": lambda: torch.empty(S, device=DEV),
        "empty triton launch": lambda: _empty[(1,)](xd),
        "forward launch (raw)": lambda: rl._launch_forward(xd, ranks, offsets, None, None,
                                                           PARAMS, True),
    }
    for name, mod in mods.items():
        rows[f"API forward, no_grad [{name}]"] = lambda mod=mod: _no_grad(mod)
        rows[f"API forward, grad [{name}]"] = lambda mod=mod: mod.ranked_preference_loss(
            x, ranks, offsets, impl="triton")
        rows[f"fwd+bwd step [{name}]"] = step_of(mod)
    for k, fn in rows.items():
        print(f"host {k:36s} {host_us(fn):7.1f} us/call")


def _no_grad(mod):
    with torch.no_grad():
        return mod.ranked_preference_loss(x, ranks, offsets, impl="triton")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    mods = {"new": rl}
    prev_path = os.environ.get("RANKED_PREV")
    if prev_path and os.path.exists(prev_path):
        spec = importlib.util.spec_from_file_location("ranked_loss_prev", prev_path)
        prev = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prev)
        mods["prev"] = prev
    for name, mod in mods.items():
        print(f"[{name}] rel err vs float64: {max_err(mod):.1e}")
        breakdown(mod, name)
    if os.environ.get("SWEEP", "1") == "1":
        defaults = dict(TILE_PAIRS=rl.TILE_PAIRS, NUM_WARPS=rl.NUM_WARPS,
                        MAX_PROGRAMS=rl.MAX_PROGRAMS)
        sweep()
        for k, v in defaults.items():  # host costs and the other mixes use the defaults
            setattr(rl, k, v)
        other_mixes()
    host_costs(mods)
