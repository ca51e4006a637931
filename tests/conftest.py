"""Suite-wide setup. The Triton interpreter must be chosen before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    # No GPU: run @triton.jit kernels through the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
