"""Session-wide test setup.

Without CUDA, kd's Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be set before triton is first
imported anywhere in the process, and which test imports kd.ops first depends on the selection and order of tests,
so it is set here, once, before any test module is collected.
"""
import glob
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def _mapped_shm_buffers() -> set[str]:
    """The DeepSpeed all-reduce buffers some live process has mapped (from /proc/*/maps): those are in use, by this
    session's runs or by another test session on the same machine."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split()[-1] for line in f if SHM_PREFIX in line)
        except OSError:  # the process ended, or is not ours to read
            pass
    return mapped


@pytest.fixture(autouse=True)
def _free_deepspeed_shared_memory():
    """Runs started without `kd train` (multinode.sh, accelerate, killed jobs) leave DeepSpeed's CPU all-reduce
    buffers in /dev/shm; after each test the ones no live process maps are removed. (Removing a mapped one would hang
    the run that owns it: its ranks find each other's buffers by name while they start.) A buffer younger than a
    minute is left too: a starting rank creates its buffer a moment before it maps it, and another test session on
    the same machine must not delete it in that moment."""
    yield
    in_use = _mapped_shm_buffers()
    for path in glob.glob(SHM_PREFIX + "*"):
        if path in in_use:
            continue
        try:
            if time.time() - os.stat(path).st_mtime < 60:
                continue
            os.remove(path)
        except OSError:
            pass
