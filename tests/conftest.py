"""Session-wide test setup.

Without CUDA, kd's Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be set before triton is first
imported anywhere in the process, and which test imports kd.ops first depends on the selection and order of tests,
so it is set here, once, before any test module is collected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
