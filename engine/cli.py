"""The ``rankpm`` command line.

    rankpm train CONFIG [KEY=VALUE ...] [--workers N] [--address HOST:PORT]
    rankpm eval MODEL_DIR DATA... [--out REPORT_DIR]
    rankpm prepare INPUT... --out DIR --tokenizer PATH_OR_KIND
    rankpm generate --out FILE --groups N --seed S

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
    p.set_defaults(run=_run_train)

    p = commands.add_parser("eval", help="evaluate a trained model folder on comparison data")
    p.add_argument("model", help="a model folder written by training (OUT_DIR/model)")
    p.add_argument("data", nargs="+", help="a prepared folder or input files (JSONL/Parquet)")
    p.add_argument("--out", help="folder for the prepared data and the report (default: a temporary one)")
    p.add_argument("--batch-groups", type=int, default=64)
    p.add_argument("--skip-bad", action="store_true", help="count and list bad rows instead of stopping")
    p.set_defaults(run=_run_eval)

    from rankpm.engine.data.prepare import add_prepare_arguments, run_prepare
    p = commands.add_parser("prepare", help="tokenize comparison files into Arrow shards")
    add_prepare_arguments(p)
    p.set_defaults(run=run_prepare)

    from rankpm.engine.data.synthetic import add_generate_arguments, run_generate
    p = commands.add_parser("generate", help="write synthetic HHH-style comparison groups (JSONL)")
    add_generate_arguments(p)
    p.set_defaults(run=run_generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    from rankpm.engine.config import ConfigError
    from rankpm.engine.data.errors import DataError
    try:
        return args.run(args) or 0
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"rankpm {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run_train(args) -> int:
    from rankpm.engine.config import load_config

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"cluster.workers={args.workers}")
    if args.address is not None:
        overrides.append(f"cluster.address={args.address}")
    cfg = load_config(args.config, overrides)
    if cfg.cluster.workers > 1 or cfg.cluster.address is not None:
        from rankpm.cluster.launch import train_on_ray
        summary = train_on_ray(cfg)
    else:
        from rankpm.engine.train import train
        summary = train(cfg)
    print(json.dumps(summary), flush=True)
    return 0


def _run_eval(args) -> int:
    from rankpm.engine.scoring import evaluate_model_folder

    report = evaluate_model_folder(args.model, args.data, out_dir=args.out, batch_groups=args.batch_groups,
                                   skip_bad=args.skip_bad)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
