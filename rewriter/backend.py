"""``torch.compile(model, backend="rewriter")``: rewrite attention in the ATen graph, then Inductor.

Inductor's own front half (aot_autograd + decompositions) produces the ATen graph; we rewrite it in
the inner compile step and hand it on to Inductor's inner compiler. A graph we cannot analyse runs
through Inductor unchanged, never wrong.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch

from passes.capture import fx_context
from passes.fastpath import open_fast_paths
from passes.find import find_matches
from passes.lower import lower_dense
from passes.planner import choose, normalise_variants
from passes.rewrite import rewrite_graph
from passes.variants import exact_name

logger = logging.getLogger(__name__)

# Sites rewritten by the backend in this process, newest last (for tests and reports).
LAST_SITES: list = []


def _rewrite_inner(gm: torch.fx.GraphModule, param_positions: set[int], variants, device: str = "cpu") -> int:
    ctx = fx_context(gm, param_positions)
    matches, _ = find_matches(ctx)
    allowed = normalise_variants(variants)
    chosen = []
    for m in matches:
        variant, params, reason = choose(m, allowed)
        if variant is not None:
            chosen.append((m, variant, params))
        else:
            logger.info("site %s stays as it was: %s", m.site.name, reason)
    failures = rewrite_graph(gm, chosen)
    LAST_SITES.extend(m.site for m, _, _ in chosen if m.site.index not in failures)
    lower_dense(gm, device)
    return len(chosen) - len(failures)


KNOWN_OPTIONS = ("variants",)


def backend_variants(options: dict) -> Any:
    """The variants a backend call asks for (default exact ``dense``), validated before any compile work."""
    opts = dict(options.get("options") or {})
    opts.update({k: v for k, v in options.items() if k not in ("options", "mode")})
    unknown = sorted(set(opts) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(f"rewriter backend: unknown option(s) {unknown}; known: {list(KNOWN_OPTIONS)}")
    variants = opts.get("variants", [exact_name()])
    normalise_variants(variants)  # an unknown variant or parameter fails here, not inside the op later
    return variants


def rewriter_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **options: Any):
    """Dynamo backend: attention rewrite on the ATen forward graph, compiled by Inductor.

    Options come as ``torch.compile(model, backend="rewriter", options={"variants": ...})``; torch.compile
    hands them over as one ``options`` dict (and ``mode`` beside it, which Inductor's own knobs ignore here).
    """
    import torch._inductor.config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    variants = backend_variants(options)
    pattern_default = torch._inductor.config.pattern_matcher
    try:
        open_fast_paths(gm)
    except Exception as e:  # the fused op stays: correct, just not rewritten
        logger.warning("could not open a fused transformer fast path: %s", e)
    params = {i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)}
    n_inputs = len(example_inputs)

    def inner(agm: torch.fx.GraphModule, inputs: Sequence[Any], *args: Any, **kwargs: Any):
        placeholders = [n for n in agm.graph.nodes if n.op == "placeholder"]
        # The forward graph keeps dynamo's input order; if aot added inputs, treat all as activations.
        positions = params if len(placeholders) == n_inputs else set()
        if kwargs.get("is_backward", False):
            return compile_fx_inner(agm, inputs, *args, **kwargs)
        # The graph as dynamo handed it: compiled instead when Inductor rejects the rewritten one.
        unchanged = torch.fx.GraphModule(agm, copy.deepcopy(agm.graph))
        seen = len(LAST_SITES)
        n = 0
        try:
            device = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
            n = _rewrite_inner(agm, positions, variants, device)
            logger.info("rewriter backend: %d attention site(s) rewritten", n)
        except Exception as e:  # never break the user's compile: run the graph unchanged
            logger.warning("rewriter backend left a graph unchanged: %s: %s", type(e).__name__, e)
            agm = unchanged
            del LAST_SITES[seen:]
        if n == 0:
            return _compile_inner(agm, inputs, *args, **kwargs)
        try:
            return _compile_inner(agm, inputs, *args, **kwargs)
        except Exception as e:  # a rewritten graph Inductor cannot lower: the original one is compiled
            logger.warning("rewriter backend: Inductor could not compile the rewritten graph (%s: %s); the graph "
                           "runs unchanged", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            del LAST_SITES[seen:]
            return _compile_inner(unchanged, inputs, *args, **kwargs)

    def _compile_inner(agm: torch.fx.GraphModule, inputs: Sequence[Any], *args: Any, **kwargs: Any):
        # the pattern passes are off only for the joint graph, before our step, where they would re-spell
        # attention; after it (the post-grad fusions) Inductor runs with its own configuration
        with torch._inductor.config.patch(pattern_matcher=pattern_default):
            return compile_fx_inner(agm, inputs, *args, **kwargs)

    # AOTAutograd's cache keys on the graph before our inner step runs: a hit would skip the rewrite,
    # and our entry would be served to plain Inductor compiles of the same graph.
    # Inductor's pattern passes run before the inner step and re-spell attention (SDPA patterns,
    # scale folded into softmax); we want the graph as the model wrote it.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches={"pattern_matcher": False})
