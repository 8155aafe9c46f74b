"""Approximate attention for long sequences: sliding window, then linear attention with calibration.

    .venv/bin/python examples/long_context_variants.py

A small Llama-style decoder (random weights, GQA 8/2), batch 2 × 1024 tokens. The report shows, per
site, the variant, its density (fraction of query-key pairs computed) and its measured error.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnopt


def main() -> None:
    config = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
                         max_position_embeddings=4096, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 1000, (2, 1024))}

    # Sliding window everywhere except the first layer, which stays exact.
    cfg = attnopt.Config(variant=attnopt.SlidingWindow(window=128),
                         overrides={"model.layers.0.*": attnopt.Fused()})
    fast = attnopt.optimize(model, inputs, config=cfg)
    print(fast.report)

    # Linear attention, its feature maps fitted per layer on calibration batches.
    calibration = [{"input_ids": torch.randint(0, 1000, (2, 512))} for _ in range(2)]
    cfg = attnopt.Config(variant=attnopt.Linear(feature_map="learned", steps=50),
                         calibration=calibration)
    linear = attnopt.optimize(model, inputs, config=cfg)
    print(linear.report)


if __name__ == "__main__":
    main()
