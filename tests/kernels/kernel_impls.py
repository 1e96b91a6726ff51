"""What both kernel test files parametrize over: the device and the implementations."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_runs_here():
    """Compiled on CUDA; on CPU only when triton itself was imported under the interpreter."""
    try:
        import triton.language.standard as tls
    except ImportError:  # pragma: no cover
        return False
    if DEVICE == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tls._sum_combine, InterpretedFunction)


HAS_TRITON = _triton_runs_here()

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton imported before TRITON_INTERPRET=1 (see conftest)"))]
