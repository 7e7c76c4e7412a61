"""A Hugging Face GPT-2 (random weights, small config) at long context: causal attention -> sliding window.

Random weights make any accuracy budget meaningless, so the variant is pinned (budget=None); see
`rewriter optimize` (the project's trained LM) for a budgeted plan. Run: python examples/gpt2_long_context.py
"""
from _common import parser, run, torch


def main() -> None:
    args = parser(__doc__).parse_args()
    from transformers import GPT2Config, GPT2Model

    n, layers, window = (64, 1, 16) if args.smoke else (2048, 2, 256)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=256, n_head=4, n_positions=n, vocab_size=1000,
                     attn_implementation="sdpa")
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, n))
    print(f"GPT-2, {layers} layer(s), hidden 256, 4 heads, {n} tokens; pinning sliding_window(window={window})")
    run(model, {"input_ids": ids}, args.reps or (3 if args.smoke else 10), budget=None,
        variants={"sliding_window": {"window": window}})


if __name__ == "__main__":
    main()
