"""Find and rewrite the attention of a small Llama-shaped model, three ways.

Run: python examples/quickstart.py
"""
import tempfile

import torch
import transformers

import rewriter

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
model = transformers.LlamaForCausalLM(config).eval()
inputs = {"input_ids": torch.randint(0, 128, (2, 17)), "attention_mask": torch.ones(2, 17, dtype=torch.long)}
inputs["attention_mask"][1, -5:] = 0

for site in rewriter.find_attention(model, inputs):
    print(site.describe())

opt = rewriter.optimize(model, inputs, variants=["dense"])
print(opt.plan)

with torch.no_grad():
    ref = model(**inputs).logits
    print("optimize: error", rewriter.relative_l2(ref, opt(**inputs).logits))
    compiled = torch.compile(model, backend="rewriter")
    print("torch.compile: error", rewriter.relative_l2(ref, compiled(**inputs).logits))

with tempfile.TemporaryDirectory() as d:
    rewriter.export(opt, d)
    loaded = rewriter.load(d)
    with torch.no_grad():
        print("export/load: error", rewriter.relative_l2(ref, loaded(**inputs).logits))
