"""Session-wide test setup.

Without CUDA, kd's Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be set before triton is first
imported anywhere in the process, and which test imports kd.ops first depends on the selection and order of tests,
so it is set here, once, before any test module is collected.
"""
import glob
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _free_deepspeed_shared_memory():
    """Runs started without `kd train` (multinode.sh, accelerate, killed jobs) leave DeepSpeed's CPU all-reduce
    buffers in /dev/shm; tests run one at a time, so after each test none of them is in use."""
    yield
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(path)
        except OSError:
            pass
