"""Multi-stage runs: each stage trains from the previous stage's weights; one report covers all.

``run_stages`` also serves single runs (no ``stages``): train, then write OUT_DIR/report/.

    stages:
      - name: pmp                      # preference-model pre-training
        data: {train: [pretrain.jsonl], eval: [finetune_eval.jsonl]}
        objective: {name: binary, lm_loss: true}
        train: {epochs: 1}
        lr_scale: 0.1
      - name: finetune
        data: {train: [finetune.jsonl], eval: [finetune_eval.jsonl]}
        objective: {name: ranked, lm_loss: true}
        lr_scale: 0.01

Each stage's sections are merged key by key over the run's own (nested mappings merge,
everything else replaces), then checked as a run config of its own. Stage i writes to
OUT_DIR/stages/{i}-{name}/; stage i > 0 starts from stage i-1's model folder
(model.init_from) and reuses its tokenizer. A stage whose folder holds stage_summary.json
is finished and is skipped on a rerun (its report section is still written).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from rankpm.engine.config import ConfigError, RunConfig, from_dict
from rankpm.engine.io import atomic_write_json

SECTIONS = ("model", "data", "objective", "train")
SUMMARY = "stage_summary.json"


def _merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def stage_name(cfg: RunConfig, i: int) -> str:
    name = cfg.stages[i].name or f"stage{i}"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def stage_configs(cfg: RunConfig) -> list[RunConfig]:
    """The run config of every stage, validated; errors name the stage and the key."""
    base = cfg.to_dict()
    base.pop("stages")
    root = Path(cfg.train.out_dir)
    out: list[RunConfig] = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}] ({stage.name or 'unnamed'})"
        raw = copy.deepcopy(base)
        for section in SECTIONS:
            _merge(raw[section], getattr(stage, section))
        if stage.lr_scale is not None:
            if "lr" in stage.train:
                raise ConfigError(f"{where}: give train.lr or lr_scale, not both")
            if stage.lr_scale <= 0:
                raise ConfigError(f"{where}.lr_scale: got {stage.lr_scale!r}, expected a positive number")
            raw["train"]["lr"] = cfg.train.lr * stage.lr_scale
        raw["train"]["out_dir"] = str(root / "stages" / f"{i}-{stage_name(cfg, i)}")
        if out:
            previous = Path(out[-1].train.out_dir) / "model"
            raw["model"]["init_from"] = str(previous)
            raw["data"]["tokenizer"] = str(previous / "tokenizer")
        try:
            out.append(from_dict(raw))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return out


def run_stages(cfg: RunConfig, runner=None, *, report: bool = True) -> dict:
    """Train every stage in order (``runner``: engine train, or the cluster's), then report.

    The run folder is locked for the whole run; the report folder is checked before the
    first step. A finished stage is reused only for the same stage config (as a resume).
    """
    from rankpm.engine.io import ensure_folder
    from rankpm.engine.train.loop import EVAL_PAIRS
    from rankpm.engine.train.resume import check_resume
    from rankpm.engine.train.run_lock import run_lock

    if runner is None:
        from rankpm.engine.train.loop import train as runner
    root = Path(cfg.train.out_dir)
    with run_lock(root):
        if report:
            ensure_folder(root / "report", key="the report folder")
        configs = stage_configs(cfg) if cfg.stages else [cfg]
        summaries, sections = [], []
        for i, stage_cfg in enumerate(configs):
            name = stage_name(cfg, i) if cfg.stages else "eval"
            done = Path(stage_cfg.train.out_dir) / SUMMARY
            if not cfg.stages:  # a single run: train() itself resumes or re-evaluates
                summary = runner(stage_cfg)
            elif done.is_file():
                summary = json.loads(done.read_text())
                check_resume(done, summary.pop("config", {}), stage_cfg.to_dict(),
                             allowed=stage_cfg.train.resume_with_changes)
            else:
                summary = dict(runner(stage_cfg), stage=name)
                atomic_write_json(done, {**summary, "config": stage_cfg.to_dict()})
            pairs_file = Path(stage_cfg.train.out_dir) / EVAL_PAIRS
            if report and pairs_file.is_file():  # the final evaluation's own pairs: nothing scored twice
                from rankpm.engine.score.report import PairData, analyse
                section = analyse(PairData(**json.loads(pairs_file.read_text())), name=name)
                sections.append(section)
                summary = dict(summary, report_accuracy=section["accuracy"])
                if section["calibration"]:
                    summary["report_ece"] = section["calibration"]["ece"]
            summaries.append(summary)
        result = {k: v for k, v in summaries[-1].items() if k != "stage"}
        if cfg.stages:
            result["stages"] = summaries
        if sections:
            from rankpm.engine.score.report import write_report
            result["report"] = str(write_report(root / "report", sections, title=f"rankpm report: {cfg.train.out_dir}"))
        return result
