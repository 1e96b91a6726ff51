"""Paths the engine tests share."""
from pathlib import Path

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
