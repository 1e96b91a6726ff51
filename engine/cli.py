"""The ``rankpm`` command line.

    rankpm train CONFIG [KEY=VALUE ...] [--workers N] [--address HOST:PORT]
    rankpm eval MODEL_OR_CHECKPOINT DATA... [--out DIR] [--report DIR]
    rankpm prepare INPUT... --out DIR --tokenizer PATH_OR_KIND
    rankpm export MODEL_DIR OUT_DIR
    rankpm serve MODEL_DIR [--host 127.0.0.1] [--port 5000] [--token T] [--replicas N]
    rankpm generate --out FILE --groups N --seed S [--text]
    rankpm cache-logits CONFIG [KEY=VALUE ...] [--workers N]
    rankpm submit CONFIG [KEY=VALUE ...] --address http://HEAD:8265 [--workers N] [--follow]
    rankpm jobs status|logs|stop JOB_ID --address http://HEAD:8265
    rankpm experiment objectives|pmp|pretrain-lm|distill [--out DIR] [options]

``train`` and ``eval`` end by printing one JSON line on stdout; logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rankpm", description="Train and evaluate preference models.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train (or resume) a preference model from a YAML config")
    p.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=3e-4 data.batch_groups=32")
    p.add_argument("--workers", type=int, help="data-parallel ranks as Ray workers (cluster.workers)")
    p.add_argument("--address", help="attach to this Ray cluster instead of an embedded one (cluster.address)")
    p.add_argument("--dashboard", action="store_true", help="with Ray: start the embedded instance's dashboard")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume a checkpoint written under other settings (train.resume_with_changes)")
    p.set_defaults(run=_run_train)

    p = commands.add_parser("eval", help="evaluate a trained model folder on comparison data")
    p.add_argument("model", help="a model folder (OUT_DIR/model), a checkpoint (OUT_DIR/checkpoints/step_N) "
                                 "or a run folder (OUT_DIR)")
    p.add_argument("data", nargs="+", help="a prepared folder or input files (JSONL/Parquet)")
    p.add_argument("--out", help="folder for the prepared data and the report (default: a temporary one)")
    p.add_argument("--batch-groups", type=int, default=64)
    p.add_argument("--skip-bad", action="store_true", help="count and list bad rows instead of stopping")
    p.add_argument("--report", help="write the report folder (JSON, markdown, calibration and score PNGs) here")
    p.add_argument("--judge", choices=["score", "binary", "logprob"],
                   help="how responses are compared (default: from the model's objective)")
    p.add_argument("--bigbench", action="store_true", help="DATA are BIG-bench task.json files (multiple choice)")
    p.set_defaults(run=_run_eval)

    from rankpm.engine.data.prepare import add_prepare_arguments, run_prepare
    p = commands.add_parser("prepare", help="tokenize comparison files into Arrow shards")
    add_prepare_arguments(p)
    p.set_defaults(run=run_prepare)

    from rankpm.engine.score.export import add_export_arguments, run_export
    p = commands.add_parser("export", help="write a model folder as a Hugging Face sequence-classification model")
    add_export_arguments(p)
    p.set_defaults(run=run_export)

    from rankpm.engine.score.server import add_serve_arguments, run_serve
    p = commands.add_parser("serve", help="serve a model over HTTP (OpenRLHF's /get_reward, /score), or on Ray Serve")
    add_serve_arguments(p)
    p.set_defaults(run=run_serve)

    from rankpm.engine.data.synthetic import add_generate_arguments, run_generate
    p = commands.add_parser("generate", help="write synthetic HHH-style comparison groups (JSONL)")
    add_generate_arguments(p)
    p.set_defaults(run=run_generate)

    p = commands.add_parser("cache-logits", help="cache a prompted teacher's top-k (or sampled) next-token "
                                                 "distributions over a corpus as Arrow logit shards")
    p.add_argument("config", help="YAML cache config, e.g. configs/cache_logits.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. distill.k=50 distill.out_dir=runs/logits")
    p.add_argument("--workers", type=int, help="split the corpus over this many Ray workers (distill.workers)")
    p.set_defaults(run=_run_cache_logits)

    from rankpm.cluster.jobs import add_jobs_arguments, add_submit_arguments, run_jobs, run_submit
    p = commands.add_parser("submit", help="submit training as a job to a Ray cluster (Jobs API)")
    add_submit_arguments(p)
    p.set_defaults(run=run_submit)
    p = commands.add_parser("jobs", help="follow a submitted job: status, logs or stop")
    add_jobs_arguments(p)
    p.set_defaults(run=run_jobs)

    p = commands.add_parser("experiment", help="small-scale replications of the paper's figures")
    experiments = p.add_subparsers(dest="experiment", required=True)
    from rankpm.engine.experiments import objectives as objectives_experiment
    from rankpm.engine.experiments import distill as distill_experiment
    from rankpm.engine.experiments import pmp as pmp_experiment
    from rankpm.engine.experiments import pretrain_lm as pretrain_lm_experiment
    for name, module in (("objectives", objectives_experiment), ("pmp", pmp_experiment),
                         ("pretrain-lm", pretrain_lm_experiment), ("distill", distill_experiment)):
        sub = experiments.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(run=lambda args, module=module: print(json.dumps(module.run(args)["rows"])) or 0)

    # KEY=VALUE overrides may come after options too (rankpm train CONFIG --workers 2 a.b=1),
    # which argparse alone leaves unparsed
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    _quiet_deepspeed()
    from rankpm.engine.config import ConfigError
    from rankpm.engine.data.errors import DataError
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"rankpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"rankpm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder without permission: what the system said, and where
        where = f" ({err.filename})" if err.filename else ""
        print(f"rankpm {args.command}: error: {err.strerror or err}{where}; nothing half-written was kept, rerun "
              f"once it is fixed", file=sys.stderr)
        return 2
    except RuntimeError as err:
        code = RUNTIME_ERRORS.get(type(err).__name__)
        if code is None:
            raise
        print(f"rankpm {args.command}: error: {err}", file=sys.stderr)
        return code


def _quiet_deepspeed() -> None:
    """transformers imports deepspeed when it is installed, and deepspeed then says on stdout (where the
    commands print their JSON line) that it found no GPU; telling it the accelerator keeps stdout clean."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# Run-time failures that are messages, not bugs, by class name (so that the command line does
# not import torch or ray to recognise them), with their exit codes.
RUNTIME_ERRORS = {
    "RunLockError": 2,  # another run holds the folder
    "CheckpointError": 2,  # no usable checkpoint, or one this layout cannot resume
    "NonFiniteError": 1,  # training stopped at a non-finite step
    "ClusterRunError": 1,  # beyond cluster.max_failures, or the workers could not start
    "JobError": 1,  # the Ray Jobs API was unreachable or refused
}


def _run_train(args) -> int:
    from rankpm.engine.config import load_config

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"cluster.workers={args.workers}")
    if args.address is not None:
        overrides.append(f"cluster.address={args.address}")
    if args.resume_with_changes:
        overrides.append("train.resume_with_changes=true")
    cfg = load_config(args.config, overrides)
    if cfg.cluster.workers > 1 or cfg.cluster.address is not None:
        from rankpm.cluster.launch import train_on_ray
        def runner(stage_cfg):
            return train_on_ray(stage_cfg, dashboard=args.dashboard)
    else:
        from rankpm.engine.train.loop import train
        runner = train
    from rankpm.engine.train.stages import run_stages  # every stage through the same runner, then the report
    summary = run_stages(cfg, runner)
    print(json.dumps(summary), flush=True)
    return 0


def _run_cache_logits(args) -> int:
    from rankpm.engine.distill.cache import cache_logits, summary
    from rankpm.engine.distill.config import load_cache_config

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"distill.workers={args.workers}")
    cfg = load_cache_config(args.config, overrides)
    run_parts = None
    if cfg.distill.workers > 1:
        from rankpm.cluster.cache_logits import run_parts_on_ray as run_parts
    manifest = cache_logits(cfg, run_parts=run_parts)
    print(json.dumps(summary(manifest, cfg.distill.out_dir)), flush=True)
    return 0


def _run_eval(args) -> int:
    from rankpm.engine.score.eval_folder import evaluate_model_folder

    data = args.data
    if args.bigbench:  # BIG-bench multiple choice -> comparison groups (JSONL) first
        from pathlib import Path
        import tempfile
        from rankpm.engine.data.bigbench import read_bigbench
        from rankpm.engine.data.synthetic_pmp import write_jsonl
        folder = Path(args.out or tempfile.mkdtemp(prefix="rankpm-bigbench-"))
        data = [str(write_jsonl(read_bigbench(path), folder / f"bigbench_{i}.jsonl")) for i, path in enumerate(data)]
    report = evaluate_model_folder(args.model, data, out_dir=args.out, batch_groups=args.batch_groups,
                                   skip_bad=args.skip_bad, report_dir=args.report, judge=args.judge)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
