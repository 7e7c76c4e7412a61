"""Seeded look-alikes: softmax-then-product programs that are not attention (zero sites expected).

Kinds: a softmax classifier times class prototypes, an MoE router mixing expert outputs, a softmax
over channels followed by a weight matmul, a softmax over a parameter mixing activations, and
pointer-network style attention over a learned memory. Each is drawn with random sizes and spellings.
"""
from __future__ import annotations

import random

from tests.fuzz_programs import HEADER, Program

KINDS = ("classifier_prototypes", "moe_router", "channel_softmax", "parameter_softmax", "pointer_memory")


def _product(r: random.Random, a: str, b: str, batched_b: bool) -> str:
    """a [.., n, c] times b ([c, e] or batched [b, c, e]) in one of several spellings."""
    if batched_b:
        return r.choice([f"torch.bmm({a}, {b})", f"{a} @ {b}", f"torch.einsum('bnc,bce->bne', {a}, {b})"])
    return r.choice([f"{a} @ {b}", f"torch.matmul({a}, {b})", f"torch.einsum('bnc,ce->bne', {a}, {b})"])


def _softmax(r: random.Random, x: str) -> str:
    return r.choice([f"{x}.softmax(-1)", f"F.softmax({x}, dim=-1)", f"torch.softmax({x}.float(), -1).to(x.dtype)",
                     f"F.softmax({x} / {r.choice(['0.5', '2.0'])}, dim=-1)"])


def generate_lookalike(seed: int) -> Program:
    """Look-alike program number ``seed``: a Model with inputs(seed) whose graph holds no attention."""
    r = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    b, n, e, c = r.choice([1, 2, 3]), r.choice([5, 7, 9]), r.choice([16, 24]), r.choice([3, 5, 8])
    init = ["        super().__init__()"]
    f = ["    def forward(self, x):", "        b, n, _ = x.shape"]
    if kind == "classifier_prototypes":
        init += ["        self.cls = nn.Linear(E, C)", "        self.proto = nn.Parameter(torch.randn(C, E))"]
        f += [f"        p = {_softmax(r, 'self.cls(x)')}", f"        return {_product(r, 'p', 'self.proto', False)}"]
    elif kind == "moe_router":
        init += ["        self.router = nn.Linear(E, C)",
                 "        self.experts = nn.ModuleList(nn.Linear(E, E) for _ in range(C))"]
        f += [f"        gate = {_softmax(r, 'self.router(x)')}",
              "        outs = torch.stack([ex(x) for ex in self.experts], dim=2)  # [b, n, C, E]",
              r.choice(["        return torch.einsum('bnc,bnce->bne', gate, outs)",
                        "        return (gate.unsqueeze(-1) * outs).sum(2)",
                        "        return torch.matmul(gate.unsqueeze(2), outs).squeeze(2)"])]
    elif kind == "channel_softmax":
        init += ["        self.w = nn.Parameter(torch.randn(E, E) / E)", "        self.inp = nn.Linear(E, E)"]
        f += [f"        p = {_softmax(r, 'self.inp(x)')}", f"        return {_product(r, 'p', 'self.w', False)}"]
    elif kind == "parameter_softmax":
        init += ["        self.logits = nn.Parameter(torch.randn(C, N))", "        self.inp = nn.Linear(E, E)"]
        f += ["        h = self.inp(x)",
              r.choice(["        return torch.softmax(self.logits, -1) @ h",
                        "        return torch.einsum('cn,bne->bce', self.logits.softmax(-1), h)",
                        "        return torch.matmul(F.softmax(self.logits * 2.0, dim=-1), h)"])]
    else:  # pointer network over a learned memory
        init += ["        self.q = nn.Linear(E, E)", "        self.mem_k = nn.Parameter(torch.randn(C, E))",
                 "        self.mem_v = nn.Parameter(torch.randn(C, E))"]
        f += ["        q = self.q(x)"]
        if r.random() < 0.5:
            f += ["        s = q @ self.mem_k.t() / math.sqrt(E)",
                  f"        return {_product(r, _softmax(r, 's'), 'self.mem_v', False)}"]
        else:
            f += ["        mk, mv = self.mem_k.expand(b, C, E), self.mem_v.expand(b, C, E)",
                  "        s = torch.bmm(q, mk.transpose(1, 2)) * E ** -0.5",
                  f"        return {_product(r, _softmax(r, 's'), 'mv', True)}"]
    consts = f"B, N, E, C = {b}, {n}, {e}, {c}\n"
    source = (HEADER + consts + "\n\nclass Model(nn.Module):\n    def __init__(self):\n" + "\n".join(init) + "\n\n"
              + "\n".join(f) + "\n\n\ndef inputs(seed):\n    g = torch.Generator().manual_seed(seed)\n"
              "    return (torch.randn(B, N, E, generator=g),)\n")
    return Program(seed, source, {}, kind)
