"""The prompt of the teacher: rankpm's HHH prompt (a package resource) or the user's own.

The prompt and a text are tokenized separately and their ids concatenated, so a text's
token ids are the same with and without the prompt: the student, which sees the text
alone, is trained on exactly the tokens the teacher predicted.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from rankpm.engine.config import ConfigError

DEFAULT = "hhh"
NONE = "none"
RESOURCE = "hhh_prompt.txt"


def default_prompt() -> str:
    """rankpm's HHH prompt: dialogues of a helpful, honest and harmless assistant."""
    return resources.files("rankpm.engine.distill").joinpath(RESOURCE).read_text(encoding="utf-8")


def resolve_prompt(spec: str) -> tuple[str, str]:
    """(prompt text, where it came from) for distill.prompt: "hhh", "none" or a text file."""
    if spec == DEFAULT:
        return default_prompt(), f"rankpm:{RESOURCE}"
    if spec == NONE:
        return "", "none"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"distill.prompt: {spec} is not a file (or 'hhh' for rankpm's prompt, 'none' for none)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"distill.prompt: {spec} is empty; use 'none' for no prompt")
    return text, str(path)


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

