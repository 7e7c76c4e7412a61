"""A seeded generator of random attention programs, each a standalone Python source with its expected site.

``generate(seed)`` draws one combination of: score operator (matmul, @, bmm, einsum, baddbmm), where
the scale goes (scores, q, split between q and k; mul or div; 1/sqrt(d) or not), masks (none, causal
built several ways, padding, user bool, user float, band, applied by add, where or masked_fill with
several fill values), softmax with or without float32 casts and eval-mode dropout, score modifiers
(soft-capping, ALiBi, relative position bias), layouts (BHND, BNHD, flattened [B*H], packed qkv),
GQA/MQA (expand, repeat_interleave, broadcast), cross-attention, and unrelated ops around the attention
(rotary embeddings, q/k norms, residuals). The program's source is its own reproducer.

Classes third-party libraries showed (issue 14) are layered on from a second random stream, so the
programs above keep their draws: dead clones of the scores, in-place dropout, in-place scales, masks and
bias writes (``+=``, slice assignment, ``masked_fill_``, boolean indexing), products under transposition
(``(k @ q.mT).mT``, ``v.mT @ p.mT``), tensor-valued score scales (per head or per query), and per-sample
lengths read from the padding mask with ``.item()`` (one site per sample, its length data-dependent).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

HEADER = """import math
import torch
import torch.nn as nn
import torch.nn.functional as F
"""


@dataclass(frozen=True)
class Program:
    """One generated attention program: its source (defines Model and inputs()) and its expected site."""

    seed: int
    source: str
    expect: dict = field(default_factory=dict)
    summary: str = ""

    def build(self):
        """(model in eval mode, inputs tuple) from the source."""
        env: dict = {}
        exec(compile(self.source, f"<fuzz program {self.seed}>", "exec"), env)
        torch = env["torch"]
        torch.manual_seed(self.seed)
        model = env["Model"]().eval()
        return model, env["inputs"](self.seed)

    def reproducer(self) -> str:
        """A standalone script that rebuilds the program and prints what the rewriter finds."""
        return (f"# fuzz program {self.seed}: {self.summary}\n# expected: {self.expect}\n{self.source}\n"
                "import rewriter\n"
                f"torch.manual_seed({self.seed})\nmodel = Model().eval()\nargs = inputs({self.seed})\n"
                "for s in rewriter.find_attention(model, args):\n    print(s.describe(), s.reason)\n"
                "opt = rewriter.optimize(model, args, variants=['dense'], budget=None)\n"
                "print(opt.plan)\nwith torch.no_grad():\n"
                "    print('error', rewriter.relative_l2(model(*args), opt(*args)))\n")


FILLS_EXACT = ("float('-inf')", "torch.finfo(s.dtype).min", "fill_tensor", "full_like")
FILLS_FINITE = ("-1e9", "-1e4", "-30.0")


def generate(seed: int) -> Program:
    """The random attention program number ``seed`` (same seed, same program)."""
    r = random.Random(seed)
    cross = r.random() < 0.2
    b = r.choice([1, 2, 3])
    n = r.choice([5, 7, 9, 13])
    m = r.choice([6, 11]) if cross else n
    h = r.choice([2, 4, 6])
    g = r.choice([d for d in (1, 2, 3, h) if h % d == 0])
    d = r.choice([4, 8, 12])
    e = r.choice([16, 24])
    layout = r.choice(["bhnd", "bhnd", "bnhd", "flat", "packed"])
    if cross and layout == "packed":
        layout = "bhnd"
    gqa = "none" if g == h else r.choice(["expand", "repeat_interleave"] + (["broadcast"] if g == 1 else []))
    if layout in ("flat", "bnhd") and gqa == "broadcast":
        gqa = "expand"
    if layout == "flat":
        op = r.choice(["bmm", "baddbmm", "matmul", "at", "einsum"])
    elif layout == "bnhd":
        op = "einsum"
    else:
        op = r.choice(["matmul", "at", "einsum"])
    scale_val = r.choice(["D ** -0.5", "D ** -0.5", "0.3", "1.0 / D"])
    scale_at = r.choice(["scores_mul", "scores_div", "q", "split"] + (["alpha"] if op == "baddbmm" else []))
    softcap = r.choice([0.0] * 4 + [3.0, 20.0])
    extras = {x for x in ("rotary", "qknorm", "residual") if r.random() < 0.3}
    if cross:
        extras.discard("rotary")
    # masks
    causal_way = None if cross or r.random() < 0.45 else r.choice(
        ["tril_buffer", "triu", "index", "full_triu", "band_causal"])
    band_sym = (not cross and causal_way is None and r.random() < 0.1)
    window = r.choice([2, 3, 4]) if causal_way == "band_causal" or band_sym else None
    padding = r.random() < 0.4
    user_bool = not padding and r.random() < 0.12
    user_float = not padding and not user_bool and r.random() < 0.12
    bias = None if cross or r.random() < 0.75 else r.choice(["alibi", "relbias"])
    has_add = bool(user_float or bias or causal_way == "full_triu")
    apply = {}
    for name, on in (("causal", causal_way and causal_way != "full_triu"), ("band", band_sym),
                     ("padding", padding), ("user_bool", user_bool)):
        if on:
            apply[name] = r.choice(["where", "masked_fill", "add"] if name == "padding" else ["where", "masked_fill"])
    has_add = has_add or apply.get("padding") == "add"
    fill = r.choice(FILLS_EXACT if has_add else FILLS_EXACT + FILLS_FINITE)
    if fill == "full_like" and layout == "flat" and padding:
        fill = "float('-inf')"
    mask_before_scale = r.random() < 0.2 and softcap == 0.0 and scale_at in ("scores_mul", "scores_div")
    softmax = r.choice(["F.softmax(s, dim=-1)", "s.softmax(-1)", "torch.softmax(s.float(), dim=-1).type_as(s)",
                        "F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)"])
    dropout = r.choice([None, "functional", "module"])
    value_op = {"matmul": "torch.matmul(p, v)", "at": "p @ v", "einsum": None, "bmm": "torch.bmm(p, v)",
                "baddbmm": "torch.bmm(p, v)"}[op]
    if layout == "flat" and op in ("matmul", "at", "einsum"):
        value_op = r.choice(["torch.bmm(p, v)", "p @ v", "torch.einsum('bqk,bkd->bqd', p, v)"])
    flat_masks_4d = layout == "flat" and r.random() < 0.5  # view scores to [b, H, n, m] for masking
    # issue 14 classes, from their own stream
    r2 = random.Random(seed * 7919 + 14)
    per_sample = (padding and layout in ("bhnd", "packed") and gqa in ("none", "broadcast") and causal_way is None
                  and not band_sym and bias is None and r2.random() < 0.5)
    dead_clone = r2.choice([None] * 6 + ["clone", "detach"])
    if dropout is None and r2.random() < 0.1:
        dropout = "module"
    inplace_drop = dropout is not None and r2.random() < 0.4
    trans_v = r2.random() < 0.15
    trans_s = op in ("matmul", "at", "bmm", "einsum") and r2.random() < 0.12
    tscale = r2.choice([None] * 9 + ["head_mul", "head_div", "head_exp"] + ([] if per_sample else ["query"]))
    inplace_bias = r2.choice([None, "full", "slice"]) if bias in ("alibi", "relbias") else None
    inplace_mask = r2.random() < 0.3
    inplace_scale = r2.random() < 0.2

    init = ["        super().__init__()"]
    if layout == "packed":
        init.append("        self.qkv = nn.Linear(E, (H + 2 * G) * D)")
    else:
        init += ["        self.q = nn.Linear(E, H * D)", "        self.k = nn.Linear(E, G * D)",
                 "        self.v = nn.Linear(E, G * D)"]
    init.append("        self.o = nn.Linear(H * D, E)")
    if "qknorm" in extras:
        init.append("        self.qn, self.kn = nn.LayerNorm(D), nn.LayerNorm(D)")
    if "rotary" in extras:
        init += ["        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))",
                 "        ang = torch.arange(32).float()[:, None] * inv[None, :]",
                 "        self.register_buffer('cos', torch.cat([ang.cos(), ang.cos()], -1), persistent=False)",
                 "        self.register_buffer('sin', torch.cat([ang.sin(), ang.sin()], -1), persistent=False)"]
    if causal_way == "tril_buffer":
        init.append("        self.register_buffer('tri', torch.ones(32, 32, dtype=torch.bool).tril(), "
                    "persistent=False)")
    if bias == "relbias":
        init.append("        self.rel = nn.Parameter(torch.randn(H, 32, 32) * 0.5)")
    if dropout == "module":
        init.append("        self.drop = nn.Dropout(0.1" + (", inplace=True)" if inplace_drop else ")"))
    if tscale in ("head_mul", "head_div", "head_exp"):
        init.append("        self.ls = nn.Parameter(torch.rand(H, 1, 1) + 0.5)")
    elif tscale == "query":
        init.append("        self.qs = nn.Parameter(torch.rand(32, 1) + 0.5)")

    args = ["x"] + (["memory"] if cross else []) + (["keep"] if padding else []) + \
        (["umask"] if user_bool or user_float else [])
    f = [f"    def forward(self, {', '.join(args)}):", "        b, n, _ = x.shape"]
    src = "memory" if cross else "x"
    f.append(f"        m = {src}.shape[1]")
    if layout == "packed":
        f += ["        qkv = self.qkv(x).view(b, n, H + 2 * G, D)",
              "        q, k, v = qkv.split([H, G, G], dim=2)"]
    else:
        f += ["        q = self.q(x).view(b, n, H, D)", f"        k = self.k({src}).view(b, m, G, D)",
              f"        v = self.v({src}).view(b, m, G, D)"]
    if "qknorm" in extras:
        f.append("        q, k = self.qn(q), self.kn(k)")
    f.append("        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
    if "rotary" in extras:
        f += ["        def rot(t):", "            t1, t2 = t.chunk(2, -1)",
              "            return torch.cat([-t2, t1], -1)",
              "        cos, sin = self.cos[:n], self.sin[:n]",
              "        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin"]
    if gqa == "expand":
        f += ["        k = k[:, :, None].expand(b, G, H // G, m, D).reshape(b, H, m, D)",
              "        v = v[:, :, None].expand(b, G, H // G, m, D).reshape(b, H, m, D)"]
    elif gqa == "repeat_interleave":
        f += ["        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)"]
    if scale_at == "q":
        f.append(f"        q = q * ({scale_val})")
    elif scale_at == "split":
        f.append(f"        q, k = q * math.sqrt({scale_val}), k * math.sqrt({scale_val})")
    # scores
    if layout == "flat":
        f += ["        q = q.reshape(b * H, n, D)", "        k = k.reshape(b * H, m, D)",
              "        v = v.reshape(b * H, m, D)"]
        s_expr = {"bmm": "torch.bmm(q, k.transpose(1, 2))", "matmul": "torch.matmul(q, k.transpose(-1, -2))",
                  "at": "q @ k.transpose(1, 2)", "einsum": "torch.einsum('bqd,bkd->bqk', q, k)",
                  "baddbmm": None}[op]
        if op == "baddbmm":
            alpha = scale_val if scale_at == "alpha" else "1.0"
            base = r.choice(["torch.zeros(1, 1, 1)", "torch.zeros(b * H, n, m)"])
            s_expr = f"torch.baddbmm({base}, q, k.transpose(1, 2), beta=0.0, alpha={alpha})"
            if bias == "alibi" and r.random() < 0.5 and not softcap:  # a bias before the cap is not expressible
                bias = "alibi_baddbmm"
                s_expr = f"torch.baddbmm(self_alibi(b, n, m), q, k.transpose(1, 2), beta=1.0, alpha={alpha})"
    elif layout == "bnhd":
        f.append("        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        s_expr = "torch.einsum('bqhd,bkhd->bhqk', q, k)"
    else:
        s_expr = {"matmul": "torch.matmul(q, k.transpose(-1, -2))", "at": "q @ k.transpose(2, 3)",
                  "einsum": "torch.einsum('bhqd,bhkd->bhqk', q, k)"}[op]
    if trans_s:  # the product written keys-first, transposed back
        s_expr = {"bmm": "torch.bmm(k, q.transpose(1, 2)).transpose(1, 2)",
                  "matmul": "torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2)",
                  "at": "(k @ q.transpose(-2, -1)).transpose(-2, -1)"}.get(op, s_expr)
        if op == "einsum":
            s_expr = {"flat": "torch.einsum('bkd,bqd->bkq', k, q).transpose(1, 2)",
                      "bnhd": "torch.einsum('bkhd,bqhd->bhkq', k, q).transpose(-1, -2)"}.get(
                layout, "torch.einsum('bhkd,bhqd->bhkq', k, q).transpose(-1, -2)")
    if bias == "alibi_baddbmm":
        f += ["        def self_alibi(b, n, m):",
              "            slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])",
              "            dist = torch.arange(m)[None, None, :].float()",
              "            return (slopes[None, :, None, None] * dist).expand(b, H, 1, m).reshape(b * H, 1, m)"]
    if per_sample:  # each sample attends over its own unpadded length, read from the mask
        f += ["        lens = keep.sum(-1)", "        y = torch.zeros(b, H, n, D, dtype=x.dtype)",
              "        q_all, k_all, v_all = q, k, v", "        for j in range(b):",
              "            L = lens[j].item()", "            torch._check(L >= 1)",
              f"            torch._check(L <= {'m' if cross else 'n'})",
              "            q = q_all[j:j + 1]" + ("" if cross else "[:, :, :L]"),
              "            k, v = k_all[j:j + 1, :, :L], v_all[j:j + 1, :, :L]"]
    body = [f"        s = {s_expr}"]
    flat4 = layout == "flat" and flat_masks_4d
    if bias == "alibi_baddbmm":
        tscale = None  # the bias inside the product comes before a tensor scale: not expressible, not drawn
    if tscale:
        t = {"head_mul": "s * self.ls", "head_div": "s / self.ls",
             "head_exp": "s * torch.clamp(self.ls, max=math.log(100.0)).exp()", "query": "s * self.qs[:n]"}[tscale]
        if layout == "flat" and tscale != "query":
            t = t.replace("self.ls", "self.ls.repeat(b, 1, 1)")
        body.append(f"        s = {t}")
    if dead_clone:  # kept for inspection; nothing reads it
        body.append("        kept = s.clone()" if dead_clone == "clone" else "        self_scores = s.detach().clone()")
    scale_stmt = {"scores_mul": f"        s = s * ({scale_val})",
                  "scores_div": f"        s = s / (1.0 / ({scale_val}))"}
    if inplace_scale:
        scale_stmt = {"scores_mul": f"        s.mul_({scale_val})",
                      "scores_div": f"        s.div_(1.0 / ({scale_val}))"}
    if scale_at in scale_stmt and not mask_before_scale:
        body.append(scale_stmt[scale_at])
    if softcap:
        body.append(r.choice([f"        s = torch.tanh(s / {softcap}) * {softcap}",
                              f"        s = {softcap} * torch.tanh(s * {1.0 / softcap!r})"]))
    flat = layout == "flat" and not flat_masks_4d
    if flat4:
        body.append("        s = s.view(b, H, n, m)")
    body += _mask_lines(r, causal_way, band_sym, window, padding and not per_sample, user_bool, user_float, bias,
                        apply, fill, flat, inplace_bias, inplace_mask)
    if mask_before_scale:
        body.append(scale_stmt[scale_at])
    body.append(f"        p = {softmax}")
    if dropout == "functional":
        body.append("        p = F.dropout(p, p=0.1, training=self.training"
                    + (", inplace=True)" if inplace_drop else ")"))
    elif dropout == "module":
        body.append("        p = self.drop(p)")
    if layout == "flat":
        if flat4:
            body.append("        p = p.view(b * H, n, m)")
        if trans_v and value_op == "torch.bmm(p, v)":
            value_op = "torch.bmm(v.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2)"
        elif trans_v and value_op == "p @ v":
            value_op = "(v.transpose(-2, -1) @ p.transpose(-2, -1)).transpose(-2, -1)"
        body += [f"        y = ({value_op}).view(b, H, n, D).transpose(1, 2).reshape(b, n, H * D)"]
    elif layout == "bnhd":
        body.append("        y = torch.einsum(" + ("'bkhd,bhqk->bqhd', v, p" if trans_v else "'bhqk,bkhd->bqhd', p, v")
                    + ").reshape(b, n, H * D)")
    else:
        vo = value_op or "torch.einsum('bhqk,bhkd->bhqd', p, v)"
        if trans_v:
            vo = ("torch.einsum('bhkd,bhqk->bhqd', v, p)" if value_op is None else
                  "(v.transpose(-2, -1) @ p.transpose(-2, -1)).transpose(-2, -1)")
        if per_sample:
            body.append(f"        y[j:j + 1{'' if cross else ', :, :L'}] = {vo}")
        else:
            body.append(f"        y = ({vo}).transpose(1, 2).reshape(b, n, H * D)")
    f += ["    " + line for line in body] if per_sample else body
    if per_sample:
        f.append("        y = y.transpose(1, 2).reshape(b, n, H * D)")
    f.append("        return x + self.o(y)" if "residual" in extras else "        return self.o(y)")

    inputs = ["def inputs(seed):", "    g = torch.Generator().manual_seed(seed)",
              "    x = torch.randn(B, N, E, generator=g)"]
    if cross:
        inputs.append("    memory = torch.randn(B, M, E, generator=g)")
    if padding:
        # trailing padding shorter than any window, so no query row loses every key
        pad = "1" if window else "1 + seed % (M // 2)"
        inputs += ["    keep = torch.ones(B, M, dtype=torch.bool)", f"    keep[-1, M - ({pad}):] = False"]
    if user_bool:
        inputs += ["    umask = torch.rand(B, 1, N, M, generator=g) > 0.4",
                   "    umask[..., 0] = True  # no fully masked row (edge tests cover those)",
                   "    umask |= torch.eye(N, M, dtype=torch.bool)  # each query keeps itself, inside any band"]
    if user_float:
        inputs.append(f"    umask = torch.randn(B, {r.choice(['1', 'H'])}, N, M, generator=g)")
    inputs.append(f"    return ({', '.join(args)},)")

    consts = f"B, N, M, H, G, D, E = {b}, {n}, {m}, {h}, {g}, {d}, {e}\n"
    source = HEADER + consts + "\n\nclass Model(nn.Module):\n    def __init__(self):\n" + "\n".join(init) + \
        "\n\n" + "\n".join(f) + "\n\n\n" + "\n".join(inputs) + "\n"
    causal = causal_way is not None
    kinds = []
    if user_float or bias:
        kinds.append("additive")
    if user_bool or band_sym:
        kinds.append("bool")
    if padding:
        kinds.append("padding")
    kind = kinds[0] if kinds else ("causal" if causal else "none")
    expect = dict(causal=causal, mask_kind=kind, is_cross=cross, num_heads=h, num_kv_heads=g, head_dim=d,
                  q_len=n, kv_len=m, batch=b, window=window, softcap=float(softcap))
    if bias:
        expect["has_bias"] = True
    elif not user_float:
        expect["has_bias"] = False
    if per_sample:  # one site per sample; the lengths depend on the data, so the finder cannot know them
        expect.update(sites=b, batch=1, mask_kind="none", kv_len=-1, q_len=n if cross else -1)
    new_classes = [name for name, on in (("per_sample", per_sample), ("dead_clone", dead_clone),
                                         ("inplace_drop", inplace_drop), ("trans_v", trans_v), ("trans_s", trans_s),
                                         ("tscale", tscale), ("inplace_bias", inplace_bias),
                                         ("inplace_mask", inplace_mask and bool(apply)),
                                         ("inplace_scale", inplace_scale and scale_at in ("scores_mul", "scores_div")))
                   if on]
    summary = (f"{layout}/{op}/{gqa} scale@{scale_at} causal={causal_way} band={band_sym} pad={padding}"
               f"[{apply.get('padding')}] ubool={user_bool} ufloat={user_float} bias={bias} fill={fill} "
               f"softcap={softcap} {sorted(extras)} cross={cross} {new_classes}")
    return Program(seed, source, expect, summary)


def _mask_lines(r, causal_way, band_sym, window, padding, user_bool, user_float, bias, apply, fill, flat,
                inplace_bias=None, inplace_mask=False) -> list:
    """Statements that build and apply the program's masks to ``s`` ([b, H, n, m] or flat [b*H, n, m]).

    ``inplace_bias``: the bias is added in place ("full": ``s += b``) or written into a slice that leaves
    out the first query and key ("slice": ``s[..., 1:, 1:] += b[..., 1:, 1:]``). ``inplace_mask``: hiding
    masks are applied by ``masked_fill_`` or boolean indexing instead.
    """
    out: list = []
    fl = fill
    if fill == "fill_tensor":
        out.append("        fill = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype).detach()")
        fl = "fill"

    def to_flat(expr: str) -> str:
        # a [b|1, 1, n|1, m] mask in the flattened [b*H, n|1, m] layout of the scores
        return f"({expr}).expand(b, H, -1, -1).reshape(b * H, ({expr}).shape[-2], m)" if flat else expr

    def hide(keep_expr: str, how: str) -> list:
        if fill == "full_like" and how == "where":
            return [f"        s = torch.where({keep_expr}, s, torch.full_like(s, torch.finfo(s.dtype).min))"]
        f2 = "torch.finfo(s.dtype).min" if fill == "full_like" else fl
        if inplace_mask:
            if how == "where":  # boolean indexing: s[hidden] = fill
                return [f"        s[(~({keep_expr})).expand_as(s)] = {f2}"]
            return [f"        s.masked_fill_(~({keep_expr}), {f2})"]
        if how == "where":
            return [f"        s = torch.where({keep_expr}, s, {f2})"]
        return [f"        s = s.masked_fill(~({keep_expr}), {f2})"]

    def add_bias(expr: str) -> str:
        if inplace_bias == "full":
            return f"        s += {expr}"
        if inplace_bias == "slice":
            lead = ":, 1:, 1:" if flat else ":, :, 1:, 1:"
            return f"        s[{lead}] += ({expr})[..., 1:, 1:]"
        return f"        s = s + {expr}"

    if causal_way:
        out.append("        i = torch.arange(n)")
        if causal_way == "tril_buffer":
            out.append("        cm = self.tri[:n, :n]")
        elif causal_way == "triu":
            out.append("        cm = ~torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)")
        elif causal_way == "index":
            out.append("        cm = i[:, None] >= i[None, :]")
        elif causal_way == "band_causal":
            out.append(f"        cm = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < {window})")
        if causal_way == "full_triu":
            out.append("        s = s + torch.full((n, n), float('-inf')).triu(1)")
        else:
            out += hide("cm", apply["causal"])
    if band_sym:
        out.append("        i = torch.arange(n)")
        out += hide(f"(i[:, None] - i[None, :]).abs() < {window}", apply["band"])
    if bias == "alibi":
        out += ["        slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)])",
                "        rel = -(torch.arange(n)[:, None] - torch.arange(m)[None, :]).abs().float()",
                "        alibi = slopes[:, None, None] * rel",
                add_bias("alibi.repeat(b, 1, 1)" if flat else "alibi")]
    elif bias == "relbias":
        out.append(add_bias("self.rel[:, :n, :m].repeat(b, 1, 1)" if flat else "self.rel[:, :n, :m]"))
    if padding:
        how = apply["padding"]
        pk = to_flat("keep[:, None, None, :]")
        if how == "add":
            big = "torch.finfo(s.dtype).min" if fill != "float('-inf')" else "-1e9"
            out.append(f"        s = s + (1.0 - {pk}.to(s.dtype)) * {big}")
        else:
            out += hide(pk, how)
    if user_bool:
        out += hide(to_flat("umask"), apply["user_bool"])
    if user_float:
        out.append(f"        s = s + {to_flat('umask')}")
    return out
