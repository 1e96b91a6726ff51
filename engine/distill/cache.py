"""``rankpm cache-logits``: run the teacher, prompt in front, over a corpus; keep per text token
its top-k log-probs, their ids and the tail's log-mass (or sampled ids with counts).

    manifest = cache_logits(load_cache_config("configs/cache_logits.yaml"))
    rankpm cache-logits configs/cache_logits.yaml distill.k=50 [--workers N]

Per worker the prompt's keys and values are computed once and every batch of texts attends
to them, expanded to the batch, instead of running the prompt again (teacher_pass.py;
``distill.reuse_prompt_cache=false`` runs prompt + text each time: the benchmark baseline).
Each text is tokenized alone (prompt.py); one that does not fit the context left after the
prompt keeps its last tokens, counted in the manifest and logged. The top k come from
kernels.topk_logits (hidden states x LM head streamed over vocabulary blocks, never the
(tokens, vocabulary) logits); sampled mode draws ``distill.samples`` tokens per position
from token blocks of the softmax, seeded per (seed, row), so the result does not depend on
batching or the number of workers.

Resume: shard j holds corpus rows [j R, (j + 1) R) (R = distill.rows_per_shard) and is
written to a temporary sibling and renamed, so a shard file is complete or absent; a rerun
(after a kill) skips the shards present, whose metadata must carry this run's fingerprint,
and redoes the rest: no row lost, none twice. The settings are kept in OUT/request.json and a
rerun under others is refused naming what differs. Worker w of N takes the shards j with
j % N == w; the manifest is written last, atomically, from the shards. The whole corpus is
read and checked before anything is written, so bad input leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from rankpm.engine.config import ConfigError
from rankpm.engine.data.logit_shards import (
    KIND, LOGIT_SCHEMA_VERSION, MANIFEST, encode_logprobs, high_bits, logit_schema, split_ids,
)
from rankpm.engine.distill.config import CacheLogitsConfig
from rankpm.engine.distill.corpus import iter_texts, scan_texts
from rankpm.engine.distill.prompt import prompt_hash, resolve_prompt
from rankpm.engine.distill.teacher import Teacher, load_teacher
from rankpm.engine.distill.teacher_pass import (
    PromptState, row_generator, sampled_entries, text_hidden, topk_entries,
)
from rankpm.engine.fingerprint import file_identity, file_sha256, require_same, tokenizer_key
from rankpm.engine.io import atomic_write_json, ensure_folder, remove_stale_temporaries, temporary_sibling

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard_{:05d}.arrow"
REQUEST = "request.json"
LOGGED_TRUNCATIONS = 5  # texts named one by one in the log; the rest counted


# ----- one worker's shards ---------------------------------------------------------------------

def run_part(cfg: CacheLogitsConfig, request: dict, part: int, parts: int, teacher: Teacher | None = None) -> dict:
    """Write the shards j % parts == part that are not there yet; return what it did."""
    teacher = teacher or load_teacher(cfg.teacher)
    if teacher.identity["weights_sha256"] != request["teacher"]["weights_sha256"]:
        raise ConfigError(f"teacher.model: worker {part} loaded other weights than the driver "
                          f"({teacher.identity['weights_sha256'][:12]} vs {request['teacher']['weights_sha256'][:12]})")
    out, R, d = Path(cfg.distill.out_dir), cfg.distill.rows_per_shard, cfg.distill
    prompt_text, _ = resolve_prompt(d.prompt)
    prompt = PromptState(teacher, teacher.tokenizer.encode(prompt_text) if prompt_text else [], d.reuse_prompt_cache)
    room = teacher.max_length - len(prompt)
    schema = logit_schema(d.mode, d.logprobs, teacher.vocab_size)
    fingerprint = request_fingerprint(request)
    written, skipped, logged, pending, current, done = 0, 0, 0, [], None, False
    for row, where, field, text in iter_texts(cfg.corpus.files, cfg.corpus.kind):
        shard = row // R
        if shard % parts != part:
            continue
        if shard != current:
            if pending:
                _write_shard(out, current, pending, teacher, prompt, schema, fingerprint, cfg)
                written += 1
            pending, current, done = [], shard, _shard_done(out, shard, fingerprint)
            skipped += done
        if done:
            continue
        ids = teacher.tokenizer.encode(text)
        cut = max(0, len(ids) - room)
        if cut:
            if logged < LOGGED_TRUNCATIONS:
                log.warning("%s: field %r (row %d): %d tokens, the context leaves %d after the prompt's %d; "
                            "cut %d from the left", where, field, row, len(ids), room, len(prompt), cut)
                logged += 1
            ids = ids[cut:]
        pending.append((row, f"{where}:{field}", ids, cut))
    if pending:
        _write_shard(out, current, pending, teacher, prompt, schema, fingerprint, cfg)
        written += 1
    return {"part": part, "written": written, "skipped": skipped}


def _shard_done(out: Path, shard: int, fingerprint: str) -> bool:
    path = out / SHARD_PATTERN.format(shard)
    if not path.is_file():
        return False
    meta = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.metadata or {}
    have = meta.get(b"rankpm_request", b"").decode()
    if have != fingerprint:
        raise ConfigError(f"{path}: written under other settings (fingerprint {have[:12]}, this run {fingerprint[:12]}); "
                          f"use another distill.out_dir or remove the folder")
    return True


def _write_shard(out: Path, shard: int, rows: list, teacher: Teacher, prompt: PromptState, schema: pa.Schema,
                 fingerprint: str, cfg: CacheLogitsConfig) -> None:
    d = cfg.distill
    bits = high_bits(teacher.vocab_size)
    columns: dict[str, list] = {name: [] for name in schema.names}
    for start in range(0, len(rows), d.batch_texts):
        batch = rows[start:start + d.batch_texts]
        hidden = text_hidden(teacher, prompt, [ids for _, _, ids, _ in batch])
        if d.mode == "topk":
            entries = topk_entries(teacher, hidden, d.k)
            logprobs, tail = entries.logprobs.float().cpu().numpy(), entries.tail_logmass.float().cpu().numpy()
            top_ids = entries.ids.cpu().numpy()
        offset = 0
        for row, source, ids, cut in batch:
            T = len(ids)
            columns["row"].append(row)
            columns["source"].append(source)
            columns["truncated"].append(cut)
            _add_ids(columns, "input_ids", np.asarray(ids), bits)
            if d.mode == "topk":
                _add_ids(columns, "ids", top_ids[offset:offset + T], bits)
                for name, values in encode_logprobs(logprobs[offset:offset + T], d.logprobs).items():
                    columns[name].append(values)
                columns["tail_logmass"].append(tail[offset:offset + T].astype(np.float16))
            else:
                drawn, counts = sampled_entries(teacher, hidden[offset:offset + T], d.samples,
                                                row_generator(d.seed, row, teacher.device))
                _add_ids(columns, "ids", drawn.cpu().numpy(), bits)
                columns["counts"].append(counts.cpu().numpy().astype(np.uint8).reshape(-1))
            offset += T
    arrays = [_list_array(columns[f.name], f.type) if pa.types.is_list(f.type) else pa.array(columns[f.name], type=f.type)
              for f in schema]
    stats = {"rows": [rows[0][0], rows[-1][0] + 1], "tokens": int(sum(len(r[2]) for r in rows)),
             "truncated_texts": sum(r[3] > 0 for r in rows), "tokens_cut": int(sum(r[3] for r in rows))}
    meta = dict(schema.metadata or {}, rankpm_request=fingerprint, rankpm_stats=json.dumps(stats))
    table = pa.Table.from_arrays(arrays, schema=schema.with_metadata(meta))
    path = out / SHARD_PATTERN.format(shard)
    tmp = temporary_sibling(path)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # complete or absent: what resume relies on
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_ids(columns: dict, name: str, ids: np.ndarray, bits: int) -> None:
    parts = split_ids(ids, bits)
    columns[name].append(parts["lo"])
    if bits:
        columns[name + "_hi"].append(parts["hi"])


def _list_array(values: list[np.ndarray], type_: pa.DataType) -> pa.Array:
    lengths = np.array([len(v) for v in values], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=type_.value_type))


# ----- the run ---------------------------------------------------------------------------------

def cache_request(cfg: CacheLogitsConfig, teacher: Teacher, prompt_text: str, prompt_source: str,
                  prompt_tokens: int) -> dict:
    """Everything that decides the cache's content; kept in OUT/request.json and compared on resume."""
    d = cfg.distill
    return {"schema_version": LOGIT_SCHEMA_VERSION, "teacher": teacher.identity,
            "tokenizer": tokenizer_key(teacher.tokenizer.identity()), "vocab_size": teacher.vocab_size,
            "max_length": teacher.max_length, "precision": cfg.teacher.precision,
            "prompt": {"source": prompt_source, "sha256": prompt_hash(prompt_text), "tokens": prompt_tokens},
            "corpus": {"kind": cfg.corpus.kind, "files": [file_identity(p) for p in cfg.corpus.files]},
            "mode": d.mode, "k": d.k if d.mode == "topk" else d.samples, "logprobs_dtype": d.logprobs,
            "seed": d.seed, "rows_per_shard": d.rows_per_shard}


def request_fingerprint(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def cache_logits(cfg: CacheLogitsConfig, *, run_parts=None) -> dict:
    """Cache the teacher's logits over the corpus into distill.out_dir (resuming what is there);
    return the manifest. ``run_parts(cfg, request, workers)`` runs the parts elsewhere (Ray)."""
    d = cfg.distill
    out = Path(d.out_dir)
    rows = scan_texts(cfg.corpus.files, cfg.corpus.kind)  # every row checked before anything is written
    if rows == 0:
        raise ValueError(f"corpus.files: {', '.join(cfg.corpus.files)} hold no texts")
    teacher = load_teacher(cfg.teacher)
    k = d.k if d.mode == "topk" else d.samples
    if d.mode == "topk" and d.k > teacher.vocab_size:
        raise ConfigError(f"distill.k: got {d.k}, expected at most the teacher's vocabulary of {teacher.vocab_size}")
    prompt_text, prompt_source = resolve_prompt(d.prompt)
    prompt_tokens = len(teacher.tokenizer.encode(prompt_text)) if prompt_text else 0
    if teacher.max_length - prompt_tokens < 2:
        raise ConfigError(f"distill.prompt: {prompt_source} takes {prompt_tokens} tokens of the teacher's context of "
                          f"{teacher.max_length}, leaving no room for text (raise teacher.max_length, or shorten it)")
    request = cache_request(cfg, teacher, prompt_text, prompt_source, prompt_tokens)
    ensure_folder(out, "distill.out_dir")
    if (out / REQUEST).is_file():
        require_same("the cache's request", f"{out / REQUEST} (the run being resumed)",
                     json.loads((out / REQUEST).read_text()), "this run", json.loads(json.dumps(request)))
        if (out / MANIFEST).is_file():
            log.info("%s: already complete", out)
            return json.loads((out / MANIFEST).read_text())
    elif any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ConfigError(f"distill.out_dir: {out} exists, is not empty and is not a logit cache; refusing to write there")
    else:
        atomic_write_json(out / REQUEST, request)
    remove_stale_temporaries(out)  # shards a killed run was writing
    if d.workers > 1 and run_parts is not None:
        run_parts(cfg, request, d.workers)
    else:
        run_part(cfg, request, 0, 1, teacher=teacher)
    return finalize(out, request, rows, k, cfg)


def finalize(out: Path, request: dict, rows: int, k: int, cfg: CacheLogitsConfig) -> dict:
    """The manifest, from the shards (every one must be there, with this run's fingerprint)."""
    R = cfg.distill.rows_per_shard
    fingerprint = request_fingerprint(request)
    shards, stats_all = [], []
    for j in range(-(-rows // R)):
        path = out / SHARD_PATTERN.format(j)
        if not _shard_done(out, j, fingerprint):
            raise ValueError(f"{path}: missing after the run; run rankpm cache-logits again to complete it")
        meta = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.metadata
        stats = json.loads(meta[b"rankpm_stats"])
        stats_all.append(stats)
        shards.append({"file": path.name, "rows": stats["rows"][1] - stats["rows"][0], "tokens": stats["tokens"],
                       "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    tokens = sum(s["tokens"] for s in stats_all)
    truncated = {"texts": sum(s["truncated_texts"] for s in stats_all),
                 "tokens_cut": sum(s["tokens_cut"] for s in stats_all), "side": "left"}
    if truncated["texts"]:
        log.warning("%s: %d of %d texts were longer than the teacher's context after the prompt and were cut from "
                    "the left (%d tokens in all); counted in the manifest", out, truncated["texts"], rows,
                    truncated["tokens_cut"])
    bits = high_bits(request["vocab_size"])
    id_dtype = "uint16" + (f"+{bits}bit" if bits else "")
    dtypes = {"ids": id_dtype, "input_ids": id_dtype}
    if request["mode"] == "topk":
        dtypes.update(logprobs=request["logprobs_dtype"], tail_logmass="fp16")
        if request["logprobs_dtype"] == "int8":
            dtypes["logprob_range"] = "fp16"
    else:
        dtypes["counts"] = "uint8"
    data_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "kind": KIND, "schema_version": LOGIT_SCHEMA_VERSION,
        "fingerprint": hashlib.sha256(json.dumps([fingerprint, [s["sha256"] for s in shards]]).encode()).hexdigest(),
        "teacher": request["teacher"], "tokenizer": request["tokenizer"], "vocab_size": request["vocab_size"],
        "prompt": request["prompt"], "mode": request["mode"], "k": k, "logprobs_dtype": request["logprobs_dtype"],
        "samples": cfg.distill.samples if request["mode"] == "sampled" else None,
        "dtypes": dtypes, "rows": rows, "tokens": tokens, "truncation": truncated,
        "bytes_per_token": round(data_bytes / max(tokens, 1), 2), "corpus": request["corpus"],
        "alignment": "entry t: the teacher's distribution of the token after text token t, given prompt + text[:t+1]",
        "request": request, "shards": shards,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def summary(manifest: dict, out: str) -> dict:
    return {"out": out, "rows": manifest["rows"], "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
            "mode": manifest["mode"], "k": manifest["k"], "bytes_per_token": manifest["bytes_per_token"],
            "truncated_texts": manifest["truncation"]["texts"]}
