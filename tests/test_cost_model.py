"""Cost model: counts against FlopCounterMode, derived pass counts, bytes, crossovers, explain CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

from cost_model import Access, Einsum, build, bytes_moved, op_counts, passes
from cost_model.analysis import visible_pairs
from cost_model.hardware import H100
from cost_model.ir import Predicate, sym
from cost_model.predict import cascade_for, crossovers, predict, time_expr

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # B, H, G, P, M, E, F
    (1, 4, 4, 64, 64, 32, 32),
    (2, 8, 2, 33, 70, 16, 16),      # GQA, Nq != Nkv
    (1, 6, 3, 128, 40, 64, 32),     # GQA, E != F
    (3, 2, 1, 1, 257, 8, 8),        # decode-like, MQA
]


def _num(expr, b, h, g, p, m, e, f):
    return int(sympy.sympify(expr).subs({sym("B"): b, sym("H"): h, sym("G"): g, sym("P"): p, sym("M"): m,
                                         sym("E"): e, sym("F"): f}))


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["dense", "dense_2pass", "dense_3pass"])
def test_dense_macs_match_flop_counter(shape, variant):
    b, h, g, p, m, e, f = shape
    q, k, v = torch.randn(b, h, p, e), torch.randn(b, g, m, e), torch.randn(b, g, m, f)

    def eager():
        kk, vv = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
        return torch.softmax(q @ kk.transpose(-1, -2) * e ** -0.5, -1) @ vv

    macs = _num(op_counts(build(variant)).macs, *shape)
    # FlopCounterMode counts a multiply-add as 2 FLOPs (it has no formula for CPU SDPA kernels)
    assert 2 * macs == _flops(eager)


def test_flop_counter_comparison_can_fail():
    """A cascade that forgets the value reduction no longer matches the counter."""
    c = build("dense_3pass")
    broken = c.replace(einsums=c.einsums[:-1] + (Einsum(Access("AV", ("b", "g", "r", "p", "f")),
                                                        (Access("A", ("b", "g", "r", "p", "m")),), ("copy",)),))
    shape = SHAPES[1]
    b, h, g, p, m, e, f = shape
    q, k, v = torch.randn(b, h, p, e), torch.randn(b, g, m, e), torch.randn(b, g, m, f)
    kk, vv = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
    assert 2 * _num(op_counts(broken).macs, *shape) != _flops(lambda: torch.softmax(q @ kk.transpose(-1, -2), -1) @ vv)


def test_derived_pass_counts():
    assert passes(build("dense_3pass")) == 3
    assert passes(build("dense_2pass")) == 2
    assert passes(build("dense")) == 1
    assert passes(build("linear")) == 1
    assert passes(build("linear", causal=True)) == 1
    # block-sparse sweeps the keys once for pooled block scores, then attends to the chosen blocks
    assert passes(build("block_sparse", schedule="fused")) == 2


def test_moving_the_divide_changes_the_pass_count():
    two = build("dense_2pass")
    names = [e.name for e in two.einsums]
    assert names[-2:] == ["SNV", "AV"]
    s, row = ("b", "g", "r", "p", "m"), ("b", "g", "r", "p")
    # normalise before the value reduction: A = SN / SD, AV = sum_m A * V
    moved = two.replace(einsums=two.einsums[:-2] + (
        Einsum(Access("A", s), (Access("SN", s), Access("SD", row)), ("div",)),
        Einsum(Access("AV", row + ("f",)), (Access("A", s), Access("V", ("b", "g", "m", "f"))), ("mul",), ("m",),
               "sum"),
    ))
    assert passes(moved) == 3
    # and the reverse edit of the 3-pass cascade gives 2
    three = build("dense_3pass")
    back = three.replace(einsums=three.einsums[:-2] + two.einsums[-2:])
    assert passes(back) == 2


def test_running_max_is_what_makes_one_pass():
    one = build("dense")
    # replace the running max by a full max over all key tiles: a pass boundary appears
    einsums = []
    for e in one.einsums:
        if e.name == "RM":
            e = Einsum(Access("RM", ("b", "g", "r", "p")), (Access("LM", ("b", "g", "r", "p", "m1")),), (), ("m1",),
                       "max")
        elif any(a.tensor == "RM" for a in e.inputs):
            e = Einsum(e.out, tuple(Access("RM", ("b", "g", "r", "p")) if a.tensor == "RM" else a for a in e.inputs),
                       e.ops, e.reduce, e.reduce_op, e.predicate)
        einsums.append(e)
    assert passes(one.replace(einsums=tuple(einsums))) == 2


def _brute(kind, p, m, causal, w=0, s=0):
    n = 0
    for i in range(p):
        a = m - p + i
        for j in range(m):
            vis = True
            if kind in ("window", "window_sinks"):
                vis = abs(a - j) < w or (kind == "window_sinks" and j < s)
            if causal or kind == "causal":
                vis = vis and j <= a
            n += vis
    return n


@pytest.mark.parametrize("p,m", [(50, 50), (7, 50), (1, 30), (30, 30)])
@pytest.mark.parametrize("kind,causal,w,s", [("causal", True, 0, 0), ("window", True, 5, 0), ("window", False, 5, 0),
                                             ("window", False, 40, 0), ("window_sinks", True, 6, 3),
                                             ("window_sinks", False, 4, 2)])
def test_visible_pairs_exact(p, m, kind, causal, w, s):
    params = () if kind == "causal" else (("W", sympy.Integer(w)),) + ((("S", sympy.Integer(s)),) if s else ())
    pred = Predicate(kind, params=params, causal=causal)
    assert int(visible_pairs(pred, sympy.Integer(p), sympy.Integer(m))) == _brute(kind, p, m, causal, w, s)


def test_flash_bytes_shrink_with_capacity_and_one_pass_beats_three():
    shape = {sym("B"): 1, sym("H"): 8, sym("G"): 8, sym("P"): 16384, sym("M"): 16384, sym("E"): 128, sym("F"): 128}
    floor = 8 * 16384 * 128 * 4 * 4  # read Q, K, V and write O once
    one = build("dense", tile_q=128)
    small = float(bytes_moved(one, 256e3).subs(shape))
    # K/V re-read once per query tile: N^2 d / tile, and tile ~ capacity / d gives N^2 d^2 / capacity
    kv = 8 * 2 * 16384 * 128 * 4
    assert small == pytest.approx(floor + kv * (16384 / 128 - 1))
    bigger_tile = float(bytes_moved(build("dense", tile_q=256), 256e3).subs(shape))
    assert bigger_tile - floor == pytest.approx((small - floor) / 2, rel=0.02)
    # a capacity holding a head's whole K and V reads them once
    assert float(bytes_moved(one, 64e6).subs(shape)) == pytest.approx(floor)
    three = build("dense_3pass", tile_q=128)
    assert float(bytes_moved(three, 256e3).subs(shape)) > 2 * small


def test_sparse_and_linear_do_less_work_than_dense_at_long_length():
    shape = dict(B=1, H=8, G=8, P=32768, M=32768, E=64, F=64)
    dense = predict("dense", shape, H100, causal=True)
    for name, params in [("sliding_window", {"window": 512}), ("linear", {"chunk": 64}),
                         ("block_sparse", {"keep": 0.1})]:
        other = predict(name, shape, H100, causal=True, **params)
        assert other.macs < dense.macs / 3
        assert other.seconds < dense.seconds


def test_gqa_reads_fewer_kv_bytes():
    c = cascade_for("dense", H100)
    mha = float(bytes_moved(c, 228e3, 0, 2).subs({sym("B"): 1, sym("H"): 32, sym("G"): 32, sym("P"): 1,
                                                   sym("M"): 8192, sym("E"): 128, sym("F"): 128}))
    gqa = float(bytes_moved(c, 228e3, 0, 2).subs({sym("B"): 1, sym("H"): 32, sym("G"): 4, sym("P"): 1,
                                                   sym("M"): 8192, sym("E"): 128, sym("F"): 128}))
    assert gqa < mha / 4


def test_crossover_dense_to_linear():
    shape = dict(B=1, H=8, G=8, E=64, F=64)
    found = crossovers({"dense": {}, "linear": {"chunk": 64}}, shape, H100, causal=True, lo=64, hi=1 << 18)
    assert found and found[0].before == "dense" and found[0].after == "linear"
    n = found[0].n
    t = {v: time_expr(cascade_for(v, H100, causal=True, **p), H100)
         for v, p in [("dense", {}), ("linear", {"chunk": 64})]}
    subs = {sym("B"): 1, sym("H"): 8, sym("G"): 8, sym("E"): 64, sym("F"): 64, sym("P"): n, sym("M"): n}
    a, b = float(t["dense"].subs(subs)), float(t["linear"].subs(subs))
    assert abs(a - b) / a < 1e-3


# ------------------------------------------------------------------ explain CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cost_model", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


SHAPE = "B=1,H=8,G=8,P=4096,M=4096,E=64,F=64"


def test_explain_text():
    r = _cli("explain", "dense_3pass", "--shape", SHAPE, "--hw", "h100")
    assert r.returncode == 0, r.stderr
    assert "QK[b,g,r,p,m] = Σ_{e} Q[b,g,r,p,e] · K[b,g,m,e]" in r.stdout
    assert "passes over the keys (derived): 3" in r.stdout
    assert "predicted seconds:" in r.stdout and "bytes to/from main memory" in r.stdout


def test_explain_json_matches_library():
    r = _cli("explain", "sliding_window", "--param", "window=128", "--shape", SHAPE, "--hw", "a100", "--causal",
             "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"passes", "flops", "bytes", "seconds"} <= set(out)
    from cost_model.hardware import A100
    want = predict("sliding_window", dict(B=1, H=8, G=8, P=4096, M=4096, E=64, F=64), A100, causal=True, window=128)
    assert out["passes"] == want.passes == 1
    assert out["flops"]["mac"] == pytest.approx(want.macs)
    assert out["seconds"] == pytest.approx(want.seconds)


@pytest.mark.parametrize("args,needle", [
    (("explain", "nope", "--shape", SHAPE), "unknown variant 'nope'"),
    (("explain", "dense", "--shape", "B=1,H=8,P=4096,M"), "malformed shape"),
    (("explain", "dense", "--shape", "B=1,H=8,P=x,M=4,E=64"), "not an integer"),
    (("explain", "dense", "--shape", "B=1,H=8,P=4,M=4"), "missing E"),
    (("explain", "dense", "--shape", "B=1,H=6,G=4,P=4,M=4,E=8"), "not a multiple"),
    (("explain", "linear", "--param", "window=3", "--shape", SHAPE), "no parameter 'window'"),
    (("explain", "dense", "--shape", SHAPE, "--hw", "tpu"), "unknown hardware"),
])
def test_explain_errors(args, needle):
    r = _cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_mask_select_is_counted_per_score_not_per_multiply_add():
    """Eager causal attention masks each (query, key) score once: its element ops do not grow with the head dim."""
    from cost_model import hardware
    from cost_model.predict import predict

    hw = hardware.get("cpu")
    counts = [predict("dense", dict(B=1, H=4, G=4, P=256, M=256, E=e, F=e), hw, causal=True,
                      form="3pass").flops["other"]
              for e in (32, 128)]
    assert counts[0] == counts[1], counts
    assert counts[0] < 16 * 4 * 256 * 256, counts  # a handful of element ops per score


def test_eager_site_pays_for_its_separate_score_passes():
    """A site whose model scales and masks the scores in separate ops is priced higher than one that does not."""
    import dataclasses

    from cost_model import hardware
    from passes import pricing
    from passes.site import AttentionSite

    site = AttentionSite(name="a", index=0, spelling="matmul", causal=True, mask_kind="causal", is_cross=False,
                         num_heads=8, num_kv_heads=8, head_dim=64, v_head_dim=64, q_len=2048, kv_len=2048, batch=1,
                         scale=0.125)
    hw = hardware.get("cpu")
    base = pricing.original_seconds(site, hw)
    two = pricing.original_seconds(dataclasses.replace(site, score_ops=2), hw)
    assert two == pytest.approx(base + 2 * pricing.score_pass_seconds(pricing.site_shape(site), hw))
    assert two > base


def test_find_counts_the_separate_score_passes():
    """Scale, mask and cast between the scores product and the value product are counted; views are not."""
    import rewriter

    class Eager(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = (q @ k.transpose(-1, -2)) * 0.125  # 1
            s = s + bias  # 2
            p = s.float().softmax(-1).to(q.dtype)  # 3 (float), softmax not counted, 4 (cast back)
            return p @ v

    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float16) for _ in range(3))
    (site,) = rewriter.find_attention(Eager(), (q, k, v, torch.randn(1, 1, 9, 9, dtype=torch.float16)))
    assert 2 <= site.score_ops <= 4, site.score_ops


def test_pricing_applies_the_calibrated_kernel_factors():
    """A profile's measured-over-predicted factor scales its cascade's price, and the variants that share the kernel."""
    import dataclasses

    from cost_model import hardware
    from passes import pricing
    from passes.site import AttentionSite

    site = AttentionSite(name="a", index=0, spelling="sdpa", causal=True, mask_kind="causal", is_cross=False,
                         num_heads=8, num_kv_heads=8, head_dim=64, v_head_dim=64, q_len=4096, kv_len=4096, batch=1,
                         scale=0.125)
    hw = hardware.get("cpu")
    slow = dataclasses.replace(hw, extra=(*hw.extra, ("factor_sliding_window", 2.0), ("factor_dense", 0.5)))
    for variant, params, factor in [("sliding_window", {"window": 256}, 2.0),
                                    ("sinks_window", {"window": 256, "sinks": 4}, 2.0),
                                    ("dense", {}, 0.5), ("linear", {"feature_map": "elu1"}, 1.0)]:
        assert pricing.seconds(site, variant, params, slow) == pytest.approx(
            factor * pricing.seconds(site, variant, params, hw)), variant
