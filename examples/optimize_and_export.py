"""Fuse every attention of a Hugging Face BERT, check it, export it to ONNX Runtime, run it.

    .venv/bin/python examples/optimize_and_export.py [out_dir]

The model is built from a config with random weights (nothing is downloaded); swap in
``BertModel.from_pretrained(<local dir>)`` for a real checkpoint.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

import attnopt


def main(out_dir: Path) -> None:
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, attn_implementation="eager")
    model = BertModel(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 64))
    attention_mask = torch.ones(2, 64, dtype=torch.long)
    attention_mask[1, 48:] = 0                                   # a padded sequence
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}

    fast = attnopt.optimize(model, inputs)                       # exact: every attention fused
    print(fast.report)

    res = attnopt.export_onnx(fast, inputs, out_dir / "bert.onnx", target="onnxruntime")
    print(res.report)
    sess = res.session()
    (hidden, *_) = sess.run(None, res.feed(inputs))
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state.numpy()
    print(f"onnxruntime vs torch: max abs diff {np.abs(hidden - ref).max():.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
