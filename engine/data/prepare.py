"""``rankpm prepare``: comparison files -> tokenized Arrow shards + manifest.json + tokenizer/.

    manifest = prepare(["hh.jsonl"], "data/train", "bytes", max_length=256)
    rankpm prepare hh.jsonl ranked.parquet --out data/train --tokenizer bpe:4000 --skip-bad

Streaming: rows are read, tokenized and written in chunks, never all held at once
("bpe:<N>" reads the inputs twice: once to train the tokenizer). The folder is built
beside OUT_DIR and renamed into place, so a failed run leaves no half-prepared folder.

Length policy: every sequence ``context + response + [eoc]`` must fit ``max_length``.
"left" keeps one shared context per group, cut from the left (keeping its end) to fit the
longest response; a response that alone does not fit keeps its end. "error" makes an
over-length group a bad row. Bad rows raise DataError, or with ``skip_bad`` are listed in
the manifest (file, line, field, reason).
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from rankpm.engine.data.errors import DataError, Where
from rankpm.engine.data.formats import response_field
from rankpm.engine.data.readers import iter_groups, read_groups
from rankpm.engine.data.schema import SCHEMA_VERSION, ComparisonGroup
from rankpm.engine.data.shards import LengthStats, ShardWriter
from rankpm.engine.data.tokenizer import build_tokenizer, load_tokenizer
from rankpm.engine.fingerprint import file_identity, tokenizer_key
from rankpm.engine.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRUNCATION_POLICIES = ("left", "error")
CHUNK_GROUPS = 256  # groups tokenized together


def truncate(context: list[int], responses: list[list[int]], max_length: int, policy: str,
             *, where: Where, fmt: str = "ranked", specials: int = 1) -> tuple[list[int], list[list[int]], bool]:
    """(context, responses, truncated) with len(context) + len(response) + specials <= max_length;
    ``specials``: the tokens framing each sequence (the end-of-context token; [CLS] and [SEP])."""
    longest = max(len(r) for r in responses)
    if len(context) + longest + specials <= max_length:
        return context, responses, False
    if policy == "error":
        k = max(range(len(responses)), key=lambda i: len(responses[i]))
        raise DataError(where, response_field(fmt, k),
                        f"sequence of {len(context) + longest + specials} tokens (context {len(context)} + response "
                        f"{longest} + {specials} special) exceeds max_length={max_length} under truncation='error'")
    room = max_length - specials
    responses = [r[-room:] if len(r) > room else r for r in responses]  # keep each response's end
    keep = room - max(len(r) for r in responses)
    context = context[len(context) - keep:] if keep > 0 else []
    return context, responses, True


def tokenizer_request(spec: str) -> dict:
    """The tokenizer a spec names, as the identity that decides token ids; "bpe:<N>" is trained
    on the inputs (whose hashes the request holds), so the spec itself stands for it."""
    if str(spec).startswith("bpe:"):
        return {"trained": str(spec)}
    return tokenizer_key(load_tokenizer(spec).identity())


def prepare_request(inputs: list[str | Path], tokenizer: str, *, max_length: int, truncation: str,
                    skip_bad: bool, transform: dict | None = None, specials: int = 1) -> dict:
    """Everything that shapes a prepared folder, recorded in its manifest and compared by whoever
    would reuse it: the inputs' contents, the tokenizer, every setting, the schema version."""
    return {"schema_version": SCHEMA_VERSION, "inputs": [file_identity(p) for p in inputs],
            "tokenizer": tokenizer_request(tokenizer), "max_length": max_length, "truncation": truncation,
            "skip_bad": skip_bad, "transform": transform or {"name": "none"},
            **({"specials": specials} if specials != 1 else {})}


def prepare(inputs: list[str | Path], out_dir: str | Path, tokenizer: str = "bytes", *, max_length: int = 512,
            truncation: str = "left", shard_size_mb: float = 64.0, rows_per_shard: int | None = None,
            skip_bad: bool = False, seed: int = 0, skipped_before: list[dict] | None = None,
            request: dict | None = None, specials: int = 1) -> dict:
    """Tokenize ``inputs`` into ``out_dir``; return the manifest.

    ``tokenizer``: "bytes", "bpe:<vocab size>" (trained on these inputs) or a tokenizer
    folder (a local transformers folder, or a prepared folder's tokenizer/). ``seed`` is
    recorded only: preparation is deterministic and keeps the input order.
    ``skipped_before``: bad rows an earlier step (a pair transform) skipped on the way to
    ``inputs``; the manifest lists them with the rest.
    ``request``: what the caller asked for (``prepare_request``; the caller's own inputs,
    before any transform), recorded in the manifest; by default the request of these inputs.
    ``specials``: the special tokens each sequence gets around it (rankpm.engine.model.reading),
    counted in max_length.
    """
    inputs = [str(p) for p in inputs]
    out_dir = Path(out_dir)
    if not inputs:
        raise ValueError("prepare: no input files given")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation={truncation!r}: expected one of {TRUNCATION_POLICIES}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: needs at least 2 (one token and the end-of-context)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ValueError(f"{out_dir}: exists, is not empty and is not a prepared folder; refusing to replace it")

    def texts():  # the first pass, for a tokenizer trained on the inputs
        for group in read_groups(inputs, skip_bad=skip_bad, skipped=[]):
            yield group.context
            yield from group.responses

    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such input file")
    if request is None:
        request = prepare_request(inputs, str(tokenizer), max_length=max_length, truncation=truncation,
                                  skip_bad=skip_bad, specials=specials)
    tok = build_tokenizer(str(tokenizer), texts)
    skipped: list[dict] = list(skipped_before or [])
    with atomic_dir(out_dir) as tmp:
        tok.save(tmp / "tokenizer")
        writer = ShardWriter(tmp, max_bytes=int(shard_size_mb * 2**20), max_rows=rows_per_shard)
        tally = _Tally(specials)
        chunk: list = []
        for item in iter_groups(inputs, skip_bad=skip_bad, skipped=skipped):
            chunk.append(item)
            if len(chunk) >= CHUNK_GROUPS:
                _write_chunk(chunk, tok, writer, tally, skipped, max_length=max_length, truncation=truncation,
                             skip_bad=skip_bad, specials=specials)
                chunk = []
        _write_chunk(chunk, tok, writer, tally, skipped, max_length=max_length, truncation=truncation,
                     skip_bad=skip_bad, specials=specials)
        shards = writer.close()
        _check_usable(inputs, tally, skipped, max_length)
        manifest = _manifest(inputs, tok, shards, tally, skipped, max_length=max_length, truncation=truncation,
                             shard_size_mb=shard_size_mb, rows_per_shard=rows_per_shard, seed=seed)
        manifest["request"] = request
        manifest["specials"] = specials
        atomic_write_json(tmp / MANIFEST, manifest)
    if skipped:
        log.warning("prepare %s: skipped %d bad rows (listed in %s)", out_dir, len(skipped), out_dir / MANIFEST)
    return manifest


class _Tally:
    def __init__(self, specials: int = 1):
        self.specials = specials
        self.groups = self.sequences = self.pairs = 0
        self.truncated_groups = self.truncated_sequences = 0
        self.groups_with_context = 0
        self.contexts_cut_away = 0  # groups with a context of which truncation kept nothing
        self.sources: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self.per_input: dict[str, Counter] = {}
        self.lengths = {name: LengthStats() for name in ("context", "response", "sequence")}
        self.input_lengths = {name: LengthStats() for name in ("context", "response", "sequence")}

    def add(self, where: Where, fmt: str, group: ComparisonGroup, row: dict, before: tuple, truncated: bool):
        k = len(group.responses)
        self.groups += 1
        self.sequences += k
        self.pairs += sum(1 for a in group.ranks for b in group.ranks if a < b)
        self.sources[group.source] += 1
        self.formats[fmt] += 1
        self.per_input.setdefault(where.file, Counter())["groups"] += 1
        for stats, (context, responses) in ((self.lengths, (row["context_ids"], row["response_ids"])),
                                            (self.input_lengths, before)):
            stats["context"].add(len(context))
            for r in responses:
                stats["response"].add(len(r))
                stats["sequence"].add(len(context) + len(r) + self.specials)
        if before[0]:
            self.groups_with_context += 1
            self.contexts_cut_away += not row["context_ids"]
        if truncated:
            self.truncated_groups += 1
            cut_context = len(before[0]) - len(row["context_ids"])
            self.truncated_sequences += sum(cut_context + len(a) - len(b) > 0
                                            for a, b in zip(before[1], row["response_ids"]))


def _check_usable(inputs: list[str], tally: "_Tally", skipped: list[dict], max_length: int) -> None:
    """No silent 0: inputs without one usable group are an error; files or contexts lost are said loudly."""
    names = ", ".join(inputs)
    if tally.groups == 0:
        if skipped:
            first = skipped[0]
            why = (f"all {len(skipped)} rows were bad, e.g. {first['file']}:{first['line']}: field "
                   f"{first['field']!r}: {first['reason']}")
        else:
            why = "no rows"
        raise ValueError(f"{names}: no usable comparison groups ({why})")
    for file in inputs:
        if not tally.per_input.get(file, Counter())["groups"]:
            bad = sum(s["file"] == file for s in skipped)
            log.warning("%s: contributes no groups (%d bad rows skipped)", file, bad)
    if tally.contexts_cut_away and tally.contexts_cut_away == tally.groups_with_context:
        raise ValueError(f"{names}: max_length={max_length} leaves no context in any of the {tally.groups_with_context} "
                         f"groups that have one (truncation keeps the responses); raise max_length")
    if tally.contexts_cut_away:
        log.warning("%s: max_length=%d leaves no context in %d of %d groups (their responses are scored "
                    "without it)", names, max_length, tally.contexts_cut_away, tally.groups_with_context)


def _write_chunk(chunk, tok, writer, tally, skipped, *, max_length, truncation, skip_bad, specials=1) -> None:
    if not chunk:
        return
    texts = []
    for _, _, group in chunk:
        texts.append(group.context)
        texts.extend(group.responses)
    ids = iter(tok.encode_batch(texts))
    for where, fmt, group in chunk:
        context = next(ids)
        responses = [next(ids) for _ in group.responses]
        try:
            cut_context, cut_responses, truncated = truncate(context, responses, max_length, truncation,
                                                             where=where, fmt=fmt, specials=specials)
            if len(set(map(tuple, cut_responses))) == 1 and len(cut_responses) > 1:
                raise DataError(where, response_field(fmt, len(responses) - 1),
                                f"the responses are identical once truncated to max_length={max_length} "
                                f"(their differences lie before the last {max(map(len, cut_responses))} tokens "
                                f"kept); raise max_length")
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(err.as_skipped())
            continue
        row = {"id": group.id, "source": group.source, "turns": group.turns, "margin": group.margin,
               "ratings": group.ratings,
               "ranks": group.ranks, "context_ids": cut_context, "response_ids": cut_responses}
        writer.add(row)
        tally.add(where, fmt, group, row, (context, responses), truncated)


def _manifest(inputs, tok, shards, tally: _Tally, skipped, **options) -> dict:
    import hashlib

    skipped_per_input = Counter(s["file"] for s in skipped)
    identity = tok.identity()
    fingerprint = hashlib.sha256(json.dumps(
        [SCHEMA_VERSION, identity["fingerprint"], options["max_length"], options["truncation"],
         [(s["file"], s["rows"], s["sha256"]) for s in shards]]).encode()).hexdigest()
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "counts": {"groups": tally.groups, "sequences": tally.sequences, "pairs": tally.pairs,
                   "skipped": len(skipped)},
        "lengths": {name: s.summary() for name, s in tally.lengths.items()},
        "lengths_before_truncation": {name: s.summary() for name, s in tally.input_lengths.items()},
        "tokenizer": identity,
        "max_length": options["max_length"],
        "truncation": {"policy": options["truncation"], "truncated_groups": tally.truncated_groups,
                       "truncated_sequences": tally.truncated_sequences,
                       "contexts_cut_away": tally.contexts_cut_away},
        "sources": dict(sorted(tally.sources.items())),
        "formats": dict(sorted(tally.formats.items())),
        "inputs": [{"file": f, "groups": tally.per_input.get(f, Counter())["groups"],
                    "skipped": skipped_per_input.get(f, 0)} for f in inputs],
        "shards": shards,
        "shard_limits": {"shard_size_mb": options["shard_size_mb"], "rows_per_shard": options["rows_per_shard"]},
        "seed": options["seed"],
        "skipped": skipped,
    }


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSON Lines (.jsonl, .jsonl.gz) or Parquet comparison files")
    parser.add_argument("--out", required=True, help="the prepared folder to write")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes', 'bpe:<vocab size>' (trained on the inputs) or a local tokenizer folder")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence, end-of-context included")
    parser.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="left",
                        help="left: cut contexts from the left (then response starts); error: over-length is bad")
    parser.add_argument("--shard-size-mb", type=float, default=64.0)
    parser.add_argument("--rows-per-shard", type=int, default=None)
    parser.add_argument("--skip-bad", action="store_true", help="count and list bad rows instead of stopping")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    manifest = prepare(args.inputs, args.out, args.tokenizer, max_length=args.max_length,
                       truncation=args.truncation, shard_size_mb=args.shard_size_mb,
                       rows_per_shard=args.rows_per_shard, skip_bad=args.skip_bad, seed=args.seed)
    summary = {"out": str(args.out), **manifest["counts"], "shards": len(manifest["shards"]),
               "truncated_groups": manifest["truncation"]["truncated_groups"]}
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_prepare_arguments(argparse.ArgumentParser(prog="rankpm prepare", description=__doc__.split("\n")[0]))
    return run_prepare(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
