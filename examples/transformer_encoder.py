"""torch.nn.TransformerEncoder (nn.MultiheadAttention inside) on a long sequence -> sliding window.

Run: python examples/transformer_encoder.py
"""
from _common import parser, run, torch


def main() -> None:
    args = parser(__doc__).parse_args()
    n, d, window = (96, 64, 16) if args.smoke else (4096, 256, 256)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1 if args.smoke else 2, enable_nested_tensor=False).eval()
    x = torch.randn(1, n, d)
    print(f"nn.TransformerEncoder, {n} tokens, d={d}, 4 heads; pinning sliding_window(window={window})")
    run(model, (x,), args.reps or (3 if args.smoke else 10), budget=None,
        variants={"sliding_window": {"window": window}})


if __name__ == "__main__":
    main()
