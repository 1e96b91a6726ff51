"""Tokenizers behind one small interface: encode, vocab_size, pad_id, eoc_id, identity, save.

    tok = load_tokenizer("bytes")                 # 256 bytes + specials, no files
    tok = load_tokenizer("data/train/tokenizer")  # what ``prepare`` saved (any kind)
    tok = load_tokenizer("/models/gpt2")          # a local transformers tokenizer folder
    tok = build_tokenizer("bpe:2000", texts=lambda: (t for t in corpus))  # trained here

A transformers tokenizer lacking the END_OF_CONTEXT or a pad token gets them added; the
identity then lists ``added_tokens`` and the model must resize its embeddings to
``vocab_size``. ``save(dir)`` writes a folder that ``load_tokenizer(dir)`` reads back with
the same identity; ``prepare`` stores it as DATA_DIR/tokenizer/ so training uses exactly it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

from rankpm.engine.data.schema import END_OF_CONTEXT, PAD

log = logging.getLogger(__name__)

META_FILE = "rankpm_tokenizer.json"
TOKENIZER_VERSION = 1
SPARE_SPECIALS = [f"<|special_{i}|>" for i in range(6)]  # room for later needs (e.g. labels)


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """The interface the engine uses; see ByteTokenizer and HFTokenizer."""

    kind: str
    vocab_size: int
    pad_id: int
    eoc_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def _write_meta(self, directory: Path) -> None:
        meta = {"version": TOKENIZER_VERSION, "identity": self.identity()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0-255; then pad, end-of-context and the spare specials.

    Special tokens never come from text: the string "<|endofcontext|>" in an input encodes
    as its bytes, so only collate places the real end-of-context token.
    """

    kind = "bytes"
    SPECIALS = [PAD, END_OF_CONTEXT, *SPARE_SPECIALS]

    def __init__(self):
        self.pad_id, self.eoc_id = 256, 257
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
            else:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
                out.append(self.SPECIALS[i - 256])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def identity(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eoc_id": self.eoc_id,
                "added_tokens": [], "fingerprint": _sha256(json.dumps(self.SPECIALS))}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._write_meta(directory)
        return directory


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (loaded from a local folder, or a BPE trained by rankpm).

    ``eoc_token``: the token scores are read at, when it is not rankpm's own: a reward model
    trained elsewhere (TRL, OpenRLHF) read its score at the tokenizer's end-of-sequence token,
    so its own tokenizer keeps that token's role and gains none.
    """

    def __init__(self, hf, *, kind: str, source: str, identity: dict | None = None, eoc_token: str | None = None):
        self.hf, self.kind = hf, kind
        eoc_token = (identity or {}).get("eoc_token", eoc_token)
        added = _ensure_specials(hf, eoc_token)
        if added:
            log.warning("tokenizer %s lacked %s: added, vocabulary grows from %d to %d tokens "
                        "(the model resizes its embeddings)", source, added, hf.vocab_size, len(hf))
        self.pad_id = hf.pad_token_id
        self.eoc_id = hf.convert_tokens_to_ids(eoc_token or END_OF_CONTEXT)
        self.vocab_size = len(hf)
        self._identity = identity or {
            "kind": kind, "source": source, "class": type(hf).__name__,
            "vocab_size": self.vocab_size, "base_vocab_size": hf.vocab_size, "added_tokens": added,
            "pad_id": self.pad_id, "eoc_id": self.eoc_id, "fingerprint": _hf_fingerprint(hf),
            **({"eoc_token": eoc_token} if eoc_token else {}),
        }
        for name in ("vocab_size", "pad_id", "eoc_id"):
            if self._identity[name] != getattr(self, name):
                raise TokenizerError(f"{source}: {name} is {getattr(self, name)}, but the saved identity "
                                     f"says {self._identity[name]}; the tokenizer folder was changed")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # a special token's text in the input is text (as for bytes): only collate places specials
        return self.hf(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def identity(self) -> dict:
        return dict(self._identity)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        self._write_meta(directory)
        return directory


def _ensure_specials(hf, eoc_token: str | None = None) -> list[str]:
    from tokenizers import AddedToken

    added = []
    if hf.pad_token is None:
        hf.add_special_tokens({"pad_token": PAD})
        added.append(PAD)
    if eoc_token is not None:
        if eoc_token not in hf.get_vocab():
            raise TokenizerError(f"end-of-context token {eoc_token!r} is not in the tokenizer's vocabulary")
    elif END_OF_CONTEXT not in hf.get_vocab():
        hf.add_tokens([AddedToken(END_OF_CONTEXT, special=True, normalized=False)], special_tokens=True)
        added.append(END_OF_CONTEXT)
    return added


def _hf_fingerprint(hf) -> str:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        return _sha256(backend.to_str())
    return _sha256(json.dumps(sorted(hf.get_vocab().items())))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE trained on ``texts``; deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, END_OF_CONTEXT, *SPARE_SPECIALS]
    if vocab_size < 256 + len(specials):
        raise TokenizerError(f"bpe:{vocab_size}: the vocabulary must hold at least the 256 bytes and "
                             f"{len(specials)} special tokens ({256 + len(specials)})")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=PAD)
    return HFTokenizer(hf, kind="bpe", source=f"bpe:{vocab_size}")


def build_tokenizer(spec: str, texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """``load_tokenizer``, plus "bpe:<vocab_size>": trained on ``texts()`` (what prepare passes)."""
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise TokenizerError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:4000") from None
        if texts is None:
            raise TokenizerError(f"tokenizer {spec!r} is trained on the input texts: use it with prepare, "
                                 f"then load the prepared folder's tokenizer/")
        return train_bpe(texts(), size)
    return load_tokenizer(spec)


def load_tokenizer(path_or_kind: str | Path) -> Tokenizer:
    """"bytes", a folder saved by ``Tokenizer.save``, or a local transformers tokenizer folder."""
    spec = str(path_or_kind)
    if spec == "bytes":
        return ByteTokenizer()
    directory = Path(spec)
    if not directory.is_dir():
        hint = " (bpe:<N> is trained by prepare)" if spec.startswith("bpe:") else ""
        raise TokenizerError(f"tokenizer {spec!r}: expected 'bytes', 'bpe:<vocab size>' or a local "
                             f"tokenizer folder, and no such folder exists{hint}")
    meta_path = directory / META_FILE
    identity = None
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != TOKENIZER_VERSION:
            raise TokenizerError(f"{meta_path}: tokenizer format version {meta.get('version')}, this "
                                 f"rankpm reads version {TOKENIZER_VERSION}")
        identity = meta["identity"]
        if identity["kind"] == "bytes":
            return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{directory}: not a transformers tokenizer folder ({err})") from None
    kind = identity["kind"] if identity else "transformers"
    return HFTokenizer(hf, kind=kind, source=str(directory), identity=identity, eoc_token=reward_model_eos(directory, hf))


def reward_model_eos(directory: Path, hf) -> str | None:
    """The end-of-sequence token of a reward model's own folder (a transformers
    sequence-classification model of one label): where that model reads its score."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    architectures = raw.get("architectures") or []
    labels = raw.get("num_labels", len(raw.get("id2label") or {0: None}))
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        return None
    if hf.eos_token is None:
        raise TokenizerError(f"{directory}: a reward model folder whose tokenizer names no end-of-sequence token; "
                             f"rankpm cannot tell where the model reads its score")
    return hf.eos_token
