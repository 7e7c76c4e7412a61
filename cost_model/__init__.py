"""Einsum-cascade cost model: symbolic costs of attention variants and predicted latency."""
from .analysis import OpCounts, Traffic, bytes_moved, footprint, kernel_traffic, op_counts, pass_levels, passes
from .cascades import CASCADES, PARAMS, build
from .ir import Access, Cascade, Einsum, Kernel, Predicate

__all__ = [
    "Access", "Cascade", "Einsum", "Kernel", "Predicate", "CASCADES", "PARAMS", "build",
    "OpCounts", "Traffic", "bytes_moved", "footprint", "kernel_traffic", "op_counts", "pass_levels", "passes",
]
