"""A Hugging Face ViT (random weights) at high resolution: global attention -> 2D neighbourhood attention.

The planner finds the image token grid from the patch embedding (class token kept global).
Run: python examples/vit_high_res.py
"""
from _common import parser, run, torch


def main() -> None:
    args = parser(__doc__).parse_args()
    from transformers import ViTConfig, ViTModel

    size, patch, kernel = (40, 5, [3, 3]) if args.smoke else (512, 16, [7, 7])
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=192, num_hidden_layers=1 if args.smoke else 2, num_attention_heads=3,
                    intermediate_size=384, image_size=size, patch_size=patch, attn_implementation="sdpa")
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    pixels = torch.randn(1, 3, size, size)
    grid = size // patch
    print(f"ViT at {size}x{size}, patch {patch}: {grid}x{grid} grid + class token = {grid * grid + 1} tokens; "
          f"pinning neighborhood_2d(kernel={kernel})")
    run(model, {"pixel_values": pixels}, args.reps or (3 if args.smoke else 10), budget=None,
        variants={"neighborhood_2d": {"kernel": kernel}})


if __name__ == "__main__":
    main()
