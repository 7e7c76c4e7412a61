"""A seeded generator of random attention programs, each a standalone Python source with its expected site.

``generate(seed)`` draws one combination of: score operator (matmul, @, bmm, einsum, baddbmm), where
the scale goes (scores, q, split between q and k; mul or div; 1/sqrt(d) or not), masks (none, causal
built several ways, padding, user bool, user float, band, applied by add, where or masked_fill with
several fill values), softmax with or without float32 casts and eval-mode dropout, score modifiers
(soft-capping, ALiBi, relative position bias), layouts (BHND, BNHD, flattened [B*H], packed qkv),
GQA/MQA (expand, repeat_interleave, broadcast), cross-attention, and unrelated ops around the attention
(rotary embeddings, q/k norms, residuals). The program's source is its own reproducer.
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
    hide = [k for k, a in apply.items() if a != "add"]
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
        init.append("        self.register_buffer('tri', torch.ones(32, 32, dtype=torch.bool).tril(), persistent=False)")
    if bias == "relbias":
        init.append("        self.rel = nn.Parameter(torch.randn(H, 32, 32) * 0.5)")
    if dropout == "module":
        init.append("        self.drop = nn.Dropout(0.1)")

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
        f += ["        def rot(t):", "            t1, t2 = t.chunk(2, -1)", "            return torch.cat([-t2, t1], -1)",
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
        f += ["        q = q.reshape(b * H, n, D)", "        k = k.reshape(b * H, m, D)", "        v = v.reshape(b * H, m, D)"]
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
    if bias == "alibi_baddbmm":
        f += ["        def self_alibi(b, n, m):",
              "            slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])",
              "            dist = torch.arange(m)[None, None, :].float()",
              "            return (slopes[None, :, None, None] * dist).expand(b, H, 1, m).reshape(b * H, 1, m)"]
    f.append(f"        s = {s_expr}")
    scale_stmt = {"scores_mul": f"        s = s * ({scale_val})", "scores_div": f"        s = s / (1.0 / ({scale_val}))"}
    if scale_at in scale_stmt and not mask_before_scale:
        f.append(scale_stmt[scale_at])
    if softcap:
        f.append(r.choice([f"        s = torch.tanh(s / {softcap}) * {softcap}",
                           f"        s = {softcap} * torch.tanh(s * {1.0 / softcap!r})"]))
    flat = layout == "flat" and not flat_masks_4d
    if layout == "flat" and flat_masks_4d:
        f.append("        s = s.view(b, H, n, m)")
    f += _mask_lines(r, causal_way, band_sym, window, padding, user_bool, user_float, bias, apply, fill, flat)
    if mask_before_scale:
        f.append(scale_stmt[scale_at])
    f.append(f"        p = {softmax}")
    if dropout == "functional":
        f.append("        p = F.dropout(p, p=0.1, training=self.training)")
    elif dropout == "module":
        f.append("        p = self.drop(p)")
    if layout == "flat":
        if flat_masks_4d:
            f.append("        p = p.view(b * H, n, m)")
        f += [f"        y = ({value_op}).view(b, H, n, D).transpose(1, 2).reshape(b, n, H * D)"]
    elif layout == "bnhd":
        f.append("        y = torch.einsum('bhqk,bkhd->bqhd', p, v).reshape(b, n, H * D)")
    else:
        vo = value_op or "torch.einsum('bhqk,bhkd->bhqd', p, v)"
        f.append(f"        y = ({vo}).transpose(1, 2).reshape(b, n, H * D)")
    f.append("        return x + self.o(y)" if "residual" in extras else "        return self.o(y)")

    inputs = [f"def inputs(seed):", "    g = torch.Generator().manual_seed(seed)",
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
    summary = (f"{layout}/{op}/{gqa} scale@{scale_at} causal={causal_way} band={band_sym} pad={padding}"
               f"[{apply.get('padding')}] ubool={user_bool} ufloat={user_float} bias={bias} fill={fill} "
               f"softcap={softcap} {sorted(extras)} cross={cross}")
    return Program(seed, source, expect, summary)


def _mask_lines(r, causal_way, band_sym, window, padding, user_bool, user_float, bias, apply, fill, flat) -> list:
    """Statements that build and apply the program's masks to ``s`` ([b, H, n, m] or flat [b*H, n, m])."""
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
        if how == "where":
            return [f"        s = torch.where({keep_expr}, s, {f2})"]
        return [f"        s = s.masked_fill(~({keep_expr}), {f2})"]

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
                "        s = s + " + ("alibi.repeat(b, 1, 1)" if flat else "alibi")]
    elif bias == "relbias":
        out.append("        s = s + " + ("self.rel[:, :n, :m].repeat(b, 1, 1)" if flat else "self.rel[:, :n, :m]"))
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
