"""The evaluation report: pair accuracy by subset, calibration, score statistics; one folder.

    pairs = evaluate(model, batches, judge="score", collect=True).pairs   # one forward per batch
    section = analyse(pairs, name="fine-tune")                 # plain dict, JSON-ready
    write_report("runs/x/report", [section])                   # report.json, report.md, PNGs

Pair accuracy counts a pair right when the better response's judgement is strictly
higher (an exact tie is wrong, as in rankpm.engine.score.evaluate); it is given overall, per
source tag and per dialogue turn count. Scores are the judge's (rankpm.engine.score.judges):
PM scores, P(GOOD) logits or mean log-probs.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rankpm.engine.score.calibration import calibration, reliability_plot


@dataclass
class PairData:
    """Every response's judgement and every ranked pair's gap, with the subsets they belong to."""

    gaps: list[float] = field(default_factory=list)  # judgement(better) - judgement(worse)
    pair_sources: list[str] = field(default_factory=list)
    pair_turns: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # every response's judgement
    score_sources: list[str] = field(default_factory=list)
    judge: str = "score"

    def add(self, judged, batch) -> None:
        """The pairs of one judged batch (rankpm.engine.score.judges.Judged)."""
        scores = judged.scores.float().cpu().tolist()
        ranks = judged.ranks.cpu().tolist()
        offsets = judged.group_offsets.cpu().tolist()
        turns = batch.turns.cpu().tolist()
        for g in range(len(offsets) - 1):
            source = batch.sources[g] if g < len(batch.sources) else ""
            lo, hi = offsets[g], offsets[g + 1]
            for i in range(lo, hi):
                self.scores.append(scores[i])
                self.score_sources.append(source)
                for j in range(lo, hi):
                    if ranks[i] < ranks[j]:
                        self.gaps.append(scores[i] - scores[j])
                        self.pair_sources.append(source)
                        self.pair_turns.append(int(turns[g]))

    @classmethod
    def merge(cls, parts: list["PairData"]) -> "PairData":
        out = cls(judge=parts[0].judge if parts else "score")
        for part in parts:
            for name in ("gaps", "pair_sources", "pair_turns", "scores", "score_sources"):
                getattr(out, name).extend(getattr(part, name))
        return out

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def collect_pairs(model, batches, *, judge: str = "score") -> PairData:
    """Judge every response once (one forward per batch), and list every ranked pair."""
    from rankpm.engine.score.evaluate import evaluate

    return evaluate(model, batches, judge=judge, collect=True).pairs


def _accuracy(gaps: np.ndarray) -> dict:
    return {"pairs": int(gaps.size), "accuracy": float((gaps > 0).mean()) if gaps.size else float("nan")}


def analyse(data: PairData, *, name: str = "eval", bins: int = 10) -> dict:
    gaps = np.asarray(data.gaps, dtype=np.float64)
    sources, turns = np.asarray(data.pair_sources), np.asarray(data.pair_turns)
    scores, score_sources = np.asarray(data.scores, dtype=np.float64), np.asarray(data.score_sources)
    by_source = {s: _accuracy(gaps[sources == s]) for s in sorted(set(data.pair_sources))}
    by_turns = {str(t): _accuracy(gaps[turns == t]) for t in sorted(set(data.pair_turns))}
    stats = {s: {"n": int((score_sources == s).sum()), "mean": float(scores[score_sources == s].mean()),
                 "std": float(scores[score_sources == s].std())} for s in sorted(set(data.score_sources))}
    return {
        "name": name,
        "judge": data.judge,
        **_accuracy(gaps),
        "by_source": by_source,
        "by_turns": by_turns,
        "calibration": calibration(gaps, bins=bins).to_dict() if gaps.size else None,
        "score_mean": float(scores.mean()) if scores.size else float("nan"),
        "score_std": float(scores.std()) if scores.size else float("nan"),
        "score_stats_by_source": stats,
        "_scores": data.scores, "_score_sources": data.score_sources, "_gaps": data.gaps,
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "eval"


def score_histogram(scores, sources, path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, sources = np.asarray(scores, dtype=np.float64), np.asarray(sources)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = np.histogram_bin_edges(scores, bins=30) if scores.size else 10
    for source in sorted(set(sources.tolist())):
        ax.hist(scores[sources == source], bins=bins, alpha=0.55, label=source or "(no source)")
    ax.set_xlabel("score")
    ax.set_ylabel("responses")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str | Path, sections: list[dict], *, title: str = "rankpm evaluation",
                 extra: dict | None = None) -> Path:
    """report.json (every number), report.md (a summary), reliability and score PNGs per section."""
    from rankpm.engine.score.calibration import Calibration, CalibrationBin

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public, md = [], [f"# {title}", ""]
    if extra:
        md += [f"- {k}: `{v}`" for k, v in extra.items()] + [""]
    md += ["| section | judge | pairs | accuracy | ECE | score mean | score std |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for s in sections:
        ece = s["calibration"]["ece"] if s["calibration"] else float("nan")
        md.append(f"| {s['name']} | {s['judge']} | {s['pairs']} | {s['accuracy']:.4f} | {ece:.4f} | "
                  f"{s['score_mean']:.3f} | {s['score_std']:.3f} |")
    for s in sections:
        slug = _slug(s["name"])
        images = {}
        if s["calibration"]:
            cal = s["calibration"]
            result = Calibration(cal["pairs"], cal["ece"], [CalibrationBin(**b) for b in cal["bins"]])
            images["reliability"] = f"reliability_{slug}.png"
            reliability_plot(result, out_dir / images["reliability"], title=f"{s['name']} ({s['judge']})")
        if s["_scores"]:
            images["scores"] = f"scores_{slug}.png"
            score_histogram(s["_scores"], s["_score_sources"], out_dir / images["scores"],
                            title=f"{s['name']}: {s['judge']} judgements by source")
        public.append({k: v for k, v in s.items() if not k.startswith("_")} | {"images": images})
        md += ["", f"## {s['name']}", "", f"Pair accuracy {s['accuracy']:.4f} over {s['pairs']} pairs "
               f"(judge: {s['judge']}).", "", "| source | pairs | accuracy | score mean | score std |",
               "|---|---:|---:|---:|---:|"]
        for src, acc in s["by_source"].items():
            st = s["score_stats_by_source"].get(src, {})
            md.append(f"| {src or '(none)'} | {acc['pairs']} | {acc['accuracy']:.4f} | "
                      f"{st.get('mean', math.nan):.3f} | {st.get('std', math.nan):.3f} |")
        md += ["", "| dialogue turns | pairs | accuracy |", "|---:|---:|---:|"]
        md += [f"| {t} | {acc['pairs']} | {acc['accuracy']:.4f} |" for t, acc in s["by_turns"].items()]
        if s["calibration"]:
            md += ["", "| confidence bin | pairs | mean confidence | observed frequency |", "|---|---:|---:|---:|"]
            md += [f"| [{b['lo']:.2f}, {b['hi']:.2f}) | {b['count']} | {b['confidence']:.3f} | {b['frequency']:.3f} |"
                   for b in s["calibration"]["bins"] if b["count"]]
        md += [""] + [f"![{kind}]({fname})" for kind, fname in images.items()]
    document = _finite({"title": title, **(extra or {}), "sections": public})
    (out_dir / "report.json").write_text(json.dumps(document, indent=2, default=_json_default, allow_nan=False))
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return out_dir


def _finite(value):
    """Strict JSON: nan and inf (an empty bin, a subset without pairs) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
