"""One rank of the distributed tests, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

``python tests/dist_worker.py OUT MODEL`` optimizes MODEL (a name in ``models()``) with ``distributed=True``,
exports the stages to OUT/artifact and writes what the test compares to OUT/rank-<R>.pt.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGET = 0.05
VARIANTS = ["dense", "sliding_window", "block_sparse"]


def variants(name: str) -> list[str]:
    """The variants a case plans with: "latent" changes the stage's weights (a factored K/V projection)."""
    return ["latent"] if name == "latent" else VARIANTS


def budget(name: str):
    """The case's budget: "latent" is forced (its speed gain is inside the margin where dense is preferred)."""
    return None if name == "latent" else BUDGET


def models() -> dict:
    """name -> builder of (model, example inputs, fresh inputs); same weights in every process."""
    from length_lms import LengthMaskLM

    def llama():
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        m = LlamaForCausalLM(cfg).eval()
        gen = torch.Generator().manual_seed(1)
        return m, {"input_ids": torch.randint(0, 96, (4, 160), generator=gen)}, {
            "input_ids": torch.randint(0, 96, (4, 160), generator=gen)}

    def gpt():
        torch.manual_seed(0)
        m = LengthMaskLM("arange", vocab=64, dim=32, heads=2, layers=4, positions=256).eval()
        gen = torch.Generator().manual_seed(1)
        return m, (torch.randint(0, 64, (4, 160), generator=gen),), (torch.randint(0, 64, (4, 160), generator=gen),)

    def latent():
        m, example, fresh = llama()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():  # K and V of rank 4 per head, as a latent-friendly trained model has
            for layer in m.model.layers:
                for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    g, e = 2, lin.weight.shape[0] // 2
                    low = torch.randn(g, e, 4, generator=gen) @ torch.randn(g, 4, lin.weight.shape[1], generator=gen)
                    lin.weight.copy_(low.reshape_as(lin.weight) * 0.05)
        return m, example, fresh

    return {"llama": llama, "gpt": gpt, "latent": latent}


def slow_model():
    """A model whose calibration takes some seconds (the fault test kills a rank during it)."""
    from length_lms import LengthMaskLM

    torch.manual_seed(0)
    m = LengthMaskLM("arange", vocab=64, dim=64, heads=4, layers=4, positions=512).eval()
    return m, (torch.randint(0, 64, (4, 384), generator=torch.Generator().manual_seed(1)),)


def main(out: str, name: str) -> None:
    """Run one rank (see the module docstring)."""
    import rewriter
    from rewriter.distributed import peak_rss_mb

    dist.init_process_group("gloo")
    model, example, fresh = models()[name]()
    # inference code calls it under inference_mode (the latent case), or with autograd on (the others)
    with torch.inference_mode() if name == "latent" else contextlib.nullcontext():
        opt = rewriter.optimize(model, example, budget=budget(name), metric="kl", variants=variants(name),
                                distributed=True)
        print(f"rank {dist.get_rank()}: optimized", file=sys.stderr, flush=True)  # where a failed run stopped
        got = opt(**fresh) if isinstance(fresh, dict) else opt(*fresh)
        rewriter.export(opt, Path(out) / "artifact")
    print(f"rank {dist.get_rank()}: exported", file=sys.stderr, flush=True)
    torch.save({"plan": opt.plan.to_json(), "out": got, "rss": peak_rss_mb(),
                "params": sum(t.numel() for t in opt.program.parameters())}, Path(out) / f"rank-{dist.get_rank()}.pt")
    dist.barrier()  # neither rank tears its connections down while the other still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
