"""What the budget measures: the error of a model's outputs against the original's, in the user's terms.

The default (``metric=None``) follows what the model returns (``resolve``):
- token logits of a causal LM (a ``[B, N, V]`` float output over integer ids ``[B, N]`` below ``V``,
  with causal attention): ``"kl"``, the mean KL divergence of the next-token distributions;
- one vector per batch row (a pooled embedding, ``[B, D]``): ``"cosine"``, 1 - mean cosine similarity;
- anything else: ``"l2"``, the relative L2 error over the positions that mean something (rows at
  padded positions, marked by a 0/1 ``*mask*`` input, are left out: their outputs are junk in the
  original too).
``"perplexity"`` is the relative rise in perplexity on the inputs' own next tokens (the ids shifted
by one): budget 0.02 means "+2% perplexity". A callable ``(reference, outputs) -> float`` is used
as given. Errors pool over samples and can be measured on a subset of batch rows, which is how
calibration holds rows back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

Metric = Union[None, str, Callable[[Any, Any], float]]
METRICS = ("l2", "kl", "cosine", "perplexity")

#: what each metric's number means, for plans and reports
DESCRIPTIONS = {
    "l2": "relative L2 of the outputs",
    "kl": "KL of next-token distributions, nats per token",
    "cosine": "1 - cosine of the embeddings",
    "perplexity": "relative perplexity rise on the inputs' next tokens",
    "custom": "the caller's metric",
}


@dataclass(frozen=True)
class MetricChoice:
    """The metric a plan is measured by, why it was chosen, and where in the outputs it looks."""

    name: str  # one of METRICS, or "custom"
    reason: str = ""
    leaf: Optional[int] = None  # index of the float output leaf it reads (the logits); None: every leaf
    ids: Optional[str] = None  # the input holding the token ids (perplexity)
    fn: Optional[Callable[[Any, Any], float]] = None  # a caller's metric

    def describe(self) -> str:
        """One line: what the number means and why this metric."""
        what = DESCRIPTIONS.get(self.name, self.name)
        return f"{what}; {self.reason}" if self.reason else what


def validate(metric: Metric) -> None:
    """Raise a ValueError naming the accepted metrics when ``metric`` is not one of them."""
    if metric is None or callable(metric) or (isinstance(metric, str) and metric in METRICS):
        return
    raise ValueError(f"unknown metric {metric!r}; the known metrics are None (chosen from what the model returns), "
                     f"{', '.join(repr(m) for m in METRICS)}, or a callable (reference_outputs, outputs) -> float")


def padding_rows(inputs: dict) -> Optional[torch.Tensor]:
    """A [B, N] bool tensor of meaningful positions, read from a 2-D 0/1 padding-mask input, or None."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or "mask" not in name.lower() or t.device.type == "meta":
            continue
        if t.dtype == torch.bool:
            return t
        if not t.is_floating_point() or bool(((t == 0) | (t == 1)).all()):
            return t != 0
    return None


def _float_leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def token_logits(inputs: dict, outputs: Any) -> Optional[tuple[int, str]]:
    """(float-leaf index, ids input name) when an output is token logits ``[B, N, V]`` over integer ids ``[B, N]``.

    Ids are a 2-D integer input that is not a padding mask, with every value in ``0..V-1``; the
    logits are the first float output with the ids' batch and length and a last dim ``V``.
    """
    ids = [(name, t) for name, t in inputs.items()
           if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool
           and "mask" not in name.lower() and t.device.type != "meta" and t.numel() > 0]
    for i, out in enumerate(_float_leaves(outputs)):
        if out.dim() != 3 or out.shape[-1] < 2:
            continue
        for name, t in ids:
            if tuple(out.shape[:2]) == tuple(t.shape) and int(t.min()) >= 0 and int(t.max()) < out.shape[-1]:
                return i, name
    return None


def check_perplexity(inputs: dict, outputs: Any) -> tuple[int, str]:
    """The logits leaf and ids input ``"perplexity"`` reads; a ValueError saying what is missing otherwise."""
    found = token_logits(inputs, outputs)
    if found is None:
        shapes = ", ".join(f"{n}{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for n, t in inputs.items()
                           if isinstance(t, torch.Tensor)) or "no tensors"
        outs = ", ".join(str(list(t.shape)) for t in _float_leaves(outputs)) or "no float tensors"
        raise ValueError(
            "metric='perplexity' needs a language model: integer token ids [B, N] in and token logits [B, N, V] "
            f"out (every id below V); this model takes {shapes} and returns {outs}. Use metric='l2', 'cosine', "
            "'kl' or a callable")
    if inputs[found[1]].shape[1] < 2:
        raise ValueError("metric='perplexity' needs sequences of 2 or more tokens (each scores its next token)")
    return found


def resolve(metric: Metric, inputs: dict, outputs: Any, causal: bool) -> MetricChoice:
    """The metric a plan uses: the caller's, or (``None``) the one that fits what the model returns."""
    validate(metric)
    if callable(metric):
        return MetricChoice("custom", "given by the caller", fn=metric)
    lm = token_logits(inputs, outputs)
    if metric == "perplexity":
        leaf, ids = check_perplexity(inputs, outputs)
        if not causal:
            raise ValueError("metric='perplexity' scores next tokens, but this model's attention is not causal "
                             "(each position sees the tokens it would predict); use metric='kl' or 'l2'")
        return MetricChoice("perplexity", f"chosen by the caller; next tokens of `{ids}`", leaf=leaf, ids=ids)
    if metric is not None:
        leaf = lm[0] if (metric == "kl" and lm) else None
        return MetricChoice(metric, "chosen by the caller", leaf=leaf)
    if lm is not None and causal:
        return MetricChoice("kl", f"the default for a causal LM: the output is token logits over the ids in `{lm[1]}`",
                            leaf=lm[0])
    leaves = _float_leaves(outputs)
    batch = next((int(t.shape[0]) for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() >= 1), None)
    if leaves and leaves[0].dim() == 2 and leaves[0].shape[0] == batch:
        return MetricChoice("cosine", "the default for pooled embeddings: the output is one vector per row", leaf=0)
    pad = padding_rows(inputs)
    where = " over non-padded positions" if pad is not None else ""
    return MetricChoice("l2", f"the default for outputs that are not token logits or pooled embeddings{where}")


def as_choice(metric: Union[Metric, MetricChoice]) -> MetricChoice:
    """A MetricChoice from a name, a callable or None (relative L2), for direct measurements."""
    if isinstance(metric, MetricChoice):
        return metric
    if callable(metric):
        return MetricChoice("custom", fn=metric)
    validate(metric)
    return MetricChoice(metric or "l2")


def select_rows(x: Any, rows: Sequence[int], batch: int) -> Any:
    """Every tensor in ``x`` whose first dim is the batch, restricted to ``rows``."""
    rows = list(rows)
    run = bool(rows) and rows == list(range(rows[0], rows[0] + len(rows)))  # consecutive rows: a view, no copy
    idx = torch.as_tensor(rows, dtype=torch.long)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.narrow(0, rows[0], len(rows)) if run else t.index_select(0, idx.to(t.device))

    return tree_map(lambda t: pick(t) if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch else t, x)


def _valid(t: torch.Tensor, pad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if pad is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(pad.shape):
        return None
    return pad


# Elements of one metric step: the float64 temporaries of a KL or an NLL over a large vocabulary stay about
# 8 MB each, whatever the batch and length (a whole 8 x 128 x 32k batch would need gigabytes).
_CHUNK = 1 << 20


def _spans(total: int, per: int) -> list[slice]:
    """Consecutive slices of ``range(total)`` holding about ``_CHUNK // per`` items each."""
    step = max(1, _CHUNK // max(per, 1))
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor, pad: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of each next token, and how many tokens were scored."""
    keep = None
    if pad is not None and tuple(pad.shape) == tuple(ids.shape):
        keep = (pad[:, 1:] & pad[:, :-1]).to(logits.device)
    total, count = torch.zeros((), dtype=torch.float64), 0
    targets = ids[:, 1:].to(logits.device)
    for row in range(ids.shape[0]):
        for span in _spans(ids.shape[1] - 1, logits.shape[-1]):
            nll = F.cross_entropy(logits[row, :-1][span].double(), targets[row, span], reduction="none")
            if keep is not None:
                nll = nll[keep[row, span]]
            total, count = total + nll.sum(), count + nll.numel()
    return total, count


def _pieces(a: torch.Tensor, b: torch.Tensor, valid: Optional[torch.Tensor], lead: int):
    """Matching float64 blocks of ``a`` and ``b`` over their first ``lead`` dims flattened, with ``valid``'s block."""
    n = 1
    for d in a.shape[:lead]:
        n *= int(d)
    a2, b2 = a.detach().reshape(n, *a.shape[lead:]), b.detach().reshape(n, *b.shape[lead:])
    v2 = None if valid is None else valid.reshape(n)
    for span in _spans(n, a2[0].numel() if n else 1):
        yield a2[span].double(), b2[span].double(), None if v2 is None else v2[span]


def sums(reference: Any, outputs: Any, metric: Union[Metric, MetricChoice], pad: Optional[torch.Tensor] = None,
         inputs: Optional[dict] = None) -> tuple[float, float]:
    """(numerator, denominator) of the metric over the outputs, so errors pool across samples."""
    choice = as_choice(metric)
    if choice.fn is not None:
        return float(choice.fn(reference, outputs)), 1.0
    ref, out = _float_leaves(reference), _float_leaves(outputs)
    if len(ref) != len(out):
        raise ValueError(f"outputs differ in structure: {len(ref)} tensors against {len(out)}")
    if choice.leaf is not None:
        ref, out = [ref[choice.leaf]], [out[choice.leaf]]
    if choice.name == "perplexity":
        if inputs is None or choice.ids not in inputs:
            raise ValueError("the perplexity metric needs the inputs' token ids")
        ids = inputs[choice.ids]
        nll_ref, n = _next_token_nll(ref[0].detach(), ids, pad)
        nll_out, _ = _next_token_nll(out[0].detach(), ids, pad)
        return float(nll_out - nll_ref), float(n)
    num = den = 0.0
    for a, b in zip(ref, out):
        valid = _valid(a, pad)
        if choice.name == "kl":
            if a.dim() < 2:
                continue
            lead = 2 if a.dim() >= 3 else (1 if valid is None else 0)
            for pa, pb, pv in (_pieces(a, b, valid, lead) if lead else [(a.double(), b.double(), valid)]):
                kl = F.kl_div(F.log_softmax(pb, -1), F.log_softmax(pa, -1), log_target=True,
                              reduction="none").sum(-1)
                if pv is not None:
                    kl = kl[pv.to(kl.device)]
                num, den = num + float(kl.sum()), den + kl.numel()
        elif choice.name == "cosine":
            a, b = a.detach().double(), b.detach().double()
            if valid is not None:
                w = valid.to(a.device, a.dtype).unsqueeze(-1)
                a = (a * w).sum(1) / w.sum(1).clamp(min=1)
                b = (b * w).sum(1) / w.sum(1).clamp(min=1)
            cos = F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1)
            num, den = num + float((1 - cos).sum()), den + cos.numel()
        else:
            lead = 2 if a.dim() >= 2 else a.dim()
            for pa, pb, pv in _pieces(a, b, valid, lead):
                d, r = (pa - pb).pow(2), pa.pow(2)
                if pv is not None:
                    v = pv.to(pa.device)
                    d, r = d[v], r[v]
                num, den = num + float(d.sum()), den + float(r.sum())
    return num, den


def finish(num: float, den: float, metric: Union[Metric, MetricChoice]) -> float:
    """The metric's value from pooled sums."""
    name = as_choice(metric).name
    if name == "perplexity":  # exp of the mean log-likelihood change: ppl_new / ppl_old - 1
        return math.expm1(num / den) if den > 0 else 0.0
    if name in ("kl", "cosine", "custom"):
        return num / den if den > 0 else 0.0
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def error(reference: Any, outputs: Any, metric: Union[Metric, MetricChoice] = None, pad: Optional[torch.Tensor] = None,
          inputs: Optional[dict] = None) -> float:
    """The metric between two outputs of the same structure (``None``: relative L2)."""
    return finish(*sums(reference, outputs, metric, pad, inputs), metric)


def relative_l2(reference: Any, candidate: Any) -> float:
    """Relative L2 distance between two outputs with the same structure (all float tensors pooled)."""
    ref, cand = _float_leaves(reference), _float_leaves(candidate)
    if len(ref) != len(cand):
        raise ValueError(f"outputs differ in structure: {len(ref)} tensors against {len(cand)}")
    num = den = 0.0
    for a, b in zip(ref, cand):
        if a.shape != b.shape:  # broadcast, as a plain difference would
            num += float((a.detach().double() - b.detach().double()).pow(2).sum())
            den += float(a.detach().double().pow(2).sum())
            continue
        for pa, pb, _ in _pieces(a.reshape(-1), b.reshape(-1), None, 1):
            num, den = num + float((pa - pb).pow(2).sum()), den + float(pa.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5
