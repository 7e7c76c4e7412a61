"""Attention graph rewriter: find every attention in a PyTorch model and rewrite it."""
from passes.capture import CaptureError
from passes.plan import Decision, Plan
from passes.site import AttentionSite
from rewriter.api import OptimizedModel, find_attention, optimize, relative_l2
from rewriter.artifact import export, load

__all__ = [
    "AttentionSite", "CaptureError", "Decision", "OptimizedModel", "Plan", "export", "find_attention", "load",
    "optimize", "relative_l2",
]
