"""Shared set-up of the Triton kernel tests; import it before triton. Without a GPU the kernels
run under the Triton interpreter on CPU (float32 and float16: the interpreter mishandles
bfloat16); with one the same tests run compiled on CUDA. The interpreter is a process-wide switch
read when the kernels are defined, so one process tests one mode."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"   # must precede the first import of triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
