"""Turn pytest-benchmark JSON into a markdown table and a PNG bar plot.

    python benchmarks/report.py benchmarks/cpu.json --out benchmarks/cpu
    -> benchmarks/cpu.md, benchmarks/cpu.png
"""
import argparse
import json
from collections import defaultdict

FAST = {"ranked_loss": ("triton", "reference"), "linear_cross_entropy": ("fused",)}


def load(paths):
    rows = []
    for p in paths:
        data = json.load(open(p))
        for b in data["benchmarks"]:
            info = dict(b.get("extra_info", {}))
            info["wall_ms"] = b["stats"]["median"] * 1e3
            info["name"] = b["name"]
            rows.append(info)
    return rows


def best_ms(r):
    """Device time with graphs if any, else device events, else wall."""
    for k in ("graph_ms", "device_ms", "wall_ms"):
        if r.get(k):
            return r[k], k
    return None, None


def table(rows):
    floors = {r["variant"]: r for r in rows if r.get("kernel") == "floor"}
    copy = floors.get("copy", {}).get("copy_GBps")
    mm = floors.get("matmul", {}).get("matmul_TFLOPs")
    launch = floors.get("empty_launch", {}).get("empty_launch_us")
    out, by_kernel = [], defaultdict(list)
    for r in rows:
        if r.get("kernel") not in (None, "floor") and r.get("variant") != "accuracy":
            by_kernel[r["kernel"]].append(r)
    dev = next((r["device"] for r in rows if "device" in r), "?")
    out.append(f"Device: {dev}. Floors measured in the same run: copy "
               f"{copy and f'{copy:.0f} GB/s'}, bf16/fp32 matmul {mm and f'{mm:.0f} TFLOP/s'}"
               f", empty launch {launch and f'{launch:.1f} us'}.\n")
    for kernel, rs in by_kernel.items():
        base = next((r for r in rs if r["variant"] in FAST.get(kernel, ())), rs[0])
        base_ms, _ = best_ms(base)
        r0 = rs[0]
        sizes = ", ".join(f"{k}={r0[k]}" for k in ("G", "K", "N", "H", "V", "dtype") if k in r0)
        out.append(f"### {kernel} ({sizes}), forward + backward\n")
        out.append("| variant | wall ms | device ms | timed as | throughput | rate | "
                   "fraction of floor | peak extra MB | time / "
                   f"{base['variant']} |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            ms, how = best_ms(r)
            thr = f"{r['work_items'] / (ms * 1e-3):,.0f} {r['unit']}/s"
            rate, frac = "", ""
            if "flops" in r:
                tf = r["flops"] / (ms * 1e-3) / 1e12
                rate = f"{tf:.1f} TFLOP/s"
                frac = f"{tf / mm:.2f} of matmul" if mm else ""
            elif "bytes" in r:
                gbs = r["bytes"] / (ms * 1e-3) / 1e9
                rate = f"{gbs:.1f} GB/s"
                if copy:
                    floor_ms = r["bytes"] / (copy * 1e9) * 1e3 + (launch or 0) * 1e-3
                    frac = f"{floor_ms / ms:.2f} (floor {floor_ms * 1e3:.1f} us)"
            dms = r.get("device_ms")
            out.append(f"| {r['variant']} | {r['wall_ms']:.3f} | "
                       f"{'' if dms is None else f'{dms:.3f}'} | {how} | {thr} | {rate} | {frac} | "
                       f"{r['peak_extra_bytes'] / 2**20:.1f} | {ms / base_ms:.2f} |")
        if "logits_bytes" in r0:
            out.append(f"\nFull logits tensor in the input dtype: {r0['logits_bytes'] / 2**20:.0f} MB.")
        out.append("")
    for r in rows:
        if r.get("variant") == "accuracy":
            out.append("Accuracy of the fused kernel against the full-logits reference: " + ", ".join(
                f"{k} {r[k]:.2e}" for k in r if k.endswith("rel_err")) + "\n")
    return "\n".join(out), by_kernel


def plot(by_kernel, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(by_kernel), 1), figsize=(6 * max(len(by_kernel), 1), 4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (kernel, rs) in zip(axes, by_kernel.items()):
        names = [r["variant"] for r in rs]
        thr = [r["work_items"] / (best_ms(r)[0] * 1e-3) for r in rs]
        ax.bar(names, thr, color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"{kernel} ({rs[0]['device'][:30]})")
        ax.set_ylabel(f"{rs[0]['unit']}/s (fwd+bwd)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True, help="path prefix for .md and .png")
    a = ap.parse_args()
    md, by_kernel = table(load(a.json))
    open(a.out + ".md", "w").write(md + "\n")
    plot(by_kernel, a.out + ".png")
    print(md)


if __name__ == "__main__":
    main()
