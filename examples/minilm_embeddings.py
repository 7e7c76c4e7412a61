"""all-MiniLM-L6-v2 with its real weights: sentence embeddings under a cosine budget.

The budget is on 1 - cosine of the model outputs; the example prints the pooled sentence
embeddings' cosine against the original. Run: python examples/minilm_embeddings.py
"""
from _common import parser, run, torch

from rewriter import models


def pooled(out, mask):
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def main() -> None:
    args = parser(__doc__).parse_args()
    seq = 64 if args.smoke else 512
    model, batch = models.minilm("eager") if args.smoke else models.hf_directory(models.minilm_dir(), "eager", seq)
    print(f"all-MiniLM-L6-v2 (real weights), {batch['input_ids'].shape[0]} sentences x "
          f"{batch['input_ids'].shape[1]} tokens")
    kw = dict(budget=None, variants=["dense"]) if args.smoke else dict(budget=0.01, metric="cosine")
    opt = run(model, batch, args.reps or (3 if args.smoke else 10), **kw)
    with torch.no_grad():
        cos = (pooled(model(**batch), batch["attention_mask"]) * pooled(opt(**batch), batch["attention_mask"])).sum(-1)
    print("sentence-embedding cosine vs original: " + ", ".join(f"{c:.5f}" for c in cos.tolist()))


if __name__ == "__main__":
    main()
