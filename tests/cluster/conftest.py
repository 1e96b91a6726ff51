"""One embedded Ray for the cluster tests' session.

Ray starts with 4 logical CPUs (two 1-CPU workers plus room for Ray Train's controller)
and no dashboard; it is shut down when the session ends, whatever happened.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()
