"""A non-editable install works from outside the checkout: the three packages and the CLI.
A process started in the checkout still imports third-party packages named like its folders."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_installed_copy_imports_from_outside_the_checkout(tmp_path):
    # built from a copy of the sources: setuptools' build/ would otherwise land in (and go stale in) the checkout
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, timeout=300)
    code = ("import rankpm.engine.train.loop, rankpm.engine.data.stream, rankpm.kernels.ranked_loss, "
            "rankpm.cluster.launch, rankpm.engine.cli as cli; "
            "from rankpm.engine.distill.prompt import default_prompt; assert 'Human:' in default_prompt(); "
            "print(rankpm.engine.train.__file__); cli.main(['--help'])")
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(target))  # the installed copy, not the checkout
    assert "train" in result.stdout and "prepare" in result.stdout and "cache-logits" in result.stdout


def test_a_process_started_in_the_checkout_imports_the_third_party_kernels_package():
    # transformers depends on Hugging Face's top-level `kernels`; the checkout's kernels/ must not shadow it
    code = ("import importlib.util, pathlib; spec = importlib.util.find_spec('kernels'); "
            "print(spec and spec.origin); import transformers.integrations.hub_kernels")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).parent != ROOT / "kernels"  # (a venv may live inside the checkout)
