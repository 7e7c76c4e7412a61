"""``strided_window``: groups of ``stride`` queries share the window around the group's centre (GNA's stride).

The registry's conformance tests (tests/test_registry.py) already run its kernel, Triton kernel, fake shape and
degenerate form; these pin its semantics against a hand-built mask and its place in the planner.
"""
from __future__ import annotations

import pytest
import torch

import codegen
import rewriter
from codegen.registry import kernel_variants


def _mask(p: int, m: int, window: int, stride: int, causal: bool) -> torch.Tensor:
    qpos = torch.arange(m - p, m)[:, None]
    kpos = torch.arange(m)[None, :]
    centre = (qpos // stride) * stride + (stride - 1) // 2
    vis = (centre - kpos).abs() < window
    return vis & (kpos <= qpos) if causal else vis


@pytest.mark.parametrize("p,m", [(45, 45), (7, 30), (1, 53)])
@pytest.mark.parametrize("window,stride", [(5, 3), (9, 8), (1, 4), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_sees_the_window_of_its_group_centre(p, m, window, stride, causal):
    g = torch.Generator().manual_seed(p * 100 + m)
    q, k, v = (torch.randn(2, 4, n, 12, generator=g) for n in (p, m, m))
    k, v = k[:, :2], v[:, :2]  # GQA: two query heads per KV head
    got = codegen.run("strided_window", q, k, v, None, 0.25, causal, window=window, stride=stride, block=16)
    vis = _mask(p, m, window, stride, causal)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    want = s.masked_fill(~vis, float("-inf")).softmax(-1).nan_to_num(0.0) @ v.double().repeat_interleave(2, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_stride_one_is_the_sliding_window():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    a = codegen.run("strided_window", q, k, v, None, 0.3, True, window=7, stride=1)
    b = codegen.run("sliding_window", q, k, v, None, 0.3, True, window=7)
    torch.testing.assert_close(a, b)


class _Local(torch.nn.Module):
    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.o = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def test_forced_through_optimize_matches_its_reference():
    torch.manual_seed(0)
    model, x = _Local().eval(), torch.randn(1, 70, 32)
    opt = rewriter.optimize(model, x, variants={"strided_window": {"window": 8, "stride": 4}}, budget=None)
    d = opt.plan.decisions[0]
    assert d.variant == "strided_window" and d.params["stride"] == 4
    x2 = torch.randn(1, 70, 32)
    with torch.no_grad():
        got = opt(x2)
        b, n, dm = x2.shape
        q, k, v = model.qkv(x2).view(b, n, 3, 2, dm // 2).permute(2, 0, 3, 1, 4)
        y = kernel_variants()["strided_window"].reference(q, k, v, None, (dm // 2) ** -0.5, True, window=8, stride=4)
        want = model.o(y.transpose(1, 2).reshape(b, n, dm))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bad_parameters_name_the_parameter():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="stride"):
        rewriter.optimize(_Local().eval(), torch.randn(1, 40, 32),
                          variants={"strided_window": {"window": 8, "stride": 0}}, budget=None)
