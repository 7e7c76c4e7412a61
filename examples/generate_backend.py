"""generate() with the KV cache through torch.compile(backend="rewriter"): a Llama-shaped causal LM.

The prefill is one attention site per layer; every decode step is a site with one query over the growing
cache. With exact `dense` the greedy tokens equal eager's; pinning `sliding_window` runs the same window in
the prefill and in every decode step. The cache length is dynamic: no recompile per generated token.

Run: python examples/generate_backend.py            (random weights; no model hub needed)
"""
import time

from _common import parser, torch

import rewriter.backend as backend  # noqa: E402
from codegen import ops  # noqa: E402
from rewriter.report import time_interleaved  # noqa: E402


def build(smoke: bool):
    """A Llama-shaped causal LM with random weights (GQA, RoPE, SwiGLU), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if smoke else \
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    config = LlamaConfig(vocab_size=512, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=8192, attn_implementation="sdpa", **size)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 4096, smoke 48)")
    ap.add_argument("--new", type=int, default=None, help="generated tokens (default 16, smoke 6)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n, new = args.prompt or (48 if args.smoke else 4096), args.new or (6 if args.smoke else 16)
    window = 16 if args.smoke else 256
    reps = args.reps or (3 if args.smoke else 5)
    ids = torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(1))

    def generator(model):
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0)

    eager = build(args.smoke)
    print(f"Llama-shaped LM, {eager.config.num_hidden_layers} layers, prompt {n} tokens, {new} new (greedy)")
    with torch.no_grad():
        ref = generator(eager)()
    runs = {"eager": generator(eager)}
    for label, options in [("dense", None), (f"sliding_window({window})",
                                             {"variants": {"sliding_window": {"window": window}}})]:
        model = build(args.smoke)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend.LAST_SITES.clear()
        model.forward = torch.compile(model.forward, backend="rewriter", options=options)
        t0 = time.perf_counter()
        with torch.no_grad(), ops.recording() as calls:
            out = generator(model)()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        decode = [c for c in calls if c["q"].shape[-2] == 1]
        same = "the same tokens as eager" if torch.equal(out, ref) else \
            f"{int((out[0, n:] == ref[0, n:]).sum())}/{new} tokens as eager"
        print(f"{label}: first generate (compiles) {time.perf_counter() - t0:.1f}s, {graphs} graph(s) compiled; "
              f"{len(calls)} attention calls, {len(decode)} decode-step calls, all "
              f"{sorted({c['variant'] for c in calls})}; {same}")
        runs[label] = generator(model)
    t = time_interleaved(runs, reps=reps, warmup=1)
    print(f"changed: every attention site, prefill and decode -> dense / sliding_window({window})")
    for label, timing in t.items():
        print(f"{label:>22}  {timing}")
    for label in list(runs)[1:]:
        print(f"speedup {label}: {t['eager'].median / t[label].median:.2f}x over eager generate() "
              "(median over median, interleaved, after warm-up)")


if __name__ == "__main__":
    main()
