"""Kernels and the custom op that every rewritten attention site calls."""
from codegen.ops import KERNELS, attention, register_kernel, run

__all__ = ["attention", "KERNELS", "register_kernel", "run"]
