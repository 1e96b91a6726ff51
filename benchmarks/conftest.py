import pytest

from harness import CUDA


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda_only" in item.keywords and not CUDA:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
