"""Where the Triton tests run: on a CUDA GPU when one is visible and TRITON_INTERPRET is not 1
(`bench/gpu_check.sh`), else on the CPU under the interpreter (tests/conftest.py sets it)."""

import os

import torch

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = torch.device("cuda" if GPU else "cpu")
