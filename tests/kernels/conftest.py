"""Kernel tests run the Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when a
kernel is decorated), so this runs before the test modules import rankpm.kernels.
On a CUDA machine it is left unset, and the same tests run the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# If another test folder imported triton first (through rankpm.engine), triton's own
# library was decorated for a GPU and the interpreter cannot run it; the kernel tests
# then skip their Triton cases (the fix: set TRITON_INTERPRET in tests/conftest.py).
