"""Look-alikes of attention (classifiers, routers, channel softmaxes, pointer networks) yield no site."""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

import rewriter
from passes.capture import capture, graph_context
from passes.find import find_matches
from tests.lookalikes import KINDS, generate_lookalike

DEFAULT_LOOKALIKES = 30
SLOW_LOOKALIKES = 200


def _run(seeds, capsys) -> Counter:
    logging.disable(logging.WARNING)
    counts: Counter = Counter()
    failures = []
    try:
        for seed in seeds:
            prog = generate_lookalike(seed)
            model, args = prog.build()
            ep, _ = capture(model, args)
            matches, rejected = find_matches(graph_context(ep))
            sites = [m.site for m in matches]
            counts["programs"] += 1
            # the softmax was looked at and turned down (the test would catch a finder that took it)
            counts["examined"] += bool(rejected)
            counts[prog.summary] += 1
            if sites:
                counts["false_positives"] += 1
                failures.append(prog.reproducer() + "\n# found: " + "; ".join(s.describe() for s in sites))
            with torch.no_grad():
                out = rewriter.optimize(model, args, variants=["dense"], budget=None)(*args) if seed % 10 == 0 else None
            if out is not None and rewriter.relative_l2(model(*args), out) > 1e-6:
                counts["changed"] += 1
    finally:
        logging.disable(logging.NOTSET)
    with capsys.disabled():
        print(f"\nlookalikes: {counts['programs']} programs, {counts['false_positives']} false positives "
              f"({', '.join(f'{k}={counts[k]}' for k in KINDS)})")
    assert counts["false_positives"] == 0 and counts["changed"] == 0, "\n\n".join(failures[:3])
    return counts


def test_lookalikes_default_tier(capsys):
    counts = _run(range(DEFAULT_LOOKALIKES), capsys)
    assert all(counts[k] >= 5 for k in KINDS)
    assert counts["examined"] >= DEFAULT_LOOKALIKES * 0.8


@pytest.mark.slow
def test_lookalikes_slow_tier(capsys):
    assert _run(range(DEFAULT_LOOKALIKES, DEFAULT_LOOKALIKES + SLOW_LOOKALIKES), capsys)["programs"] == SLOW_LOOKALIKES
