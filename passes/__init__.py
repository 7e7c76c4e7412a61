"""Analyses and rewrites over ATen FX graphs: finding attention, masks, planning, graph surgery."""
from passes.find import GraphContext, Match, find_matches
from passes.plan import Decision, Plan
from passes.site import AttentionSite

__all__ = ["AttentionSite", "Decision", "GraphContext", "Match", "Plan", "find_matches"]
