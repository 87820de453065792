"""Shared pytest setup.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test
module imports triton or ``cpd_mtp.kernels``. Without CUDA the kernels can only run in the
interpreter; with CUDA the variable is left alone so the CUDA tests exercise real kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No hub, no wandb account, DeepSpeed on CPU, and a cache the tests own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"  # tests never talk to wandb, whatever the shell says
os.environ.setdefault("CPD_MTP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".test_cache"))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
