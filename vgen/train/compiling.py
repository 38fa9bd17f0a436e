"""torch.compile in training: whether it can run here, and running networks without it."""

from __future__ import annotations

import contextlib
import os
import shutil

import torch


def eager():
    """Validation and samples run the networks eagerly: under no_grad a compiled module traces and
    compiles a second graph (about 30 s cold on 2 CPU cores) for a few batches. torch < 2.6 has no
    set_stance and compiles that graph."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor would use for CPU kernels ($CXX, else g++ or clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)
