"""Suite-wide settings, applied before any test module imports torch extensions.

Without a GPU: Triton kernels run under the interpreter (it must be chosen before triton
is first imported, and engine tests import the kernels too), DeepSpeed uses the CPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
