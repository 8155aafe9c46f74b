"""Decode speed of a Linear (recurrent-state) decoder file vs the exact (KV-cache) file.

Model: the random-weight Llama of ``bench_decode_streaming.py`` (hidden 512, 8 layers, 8 heads =
8 kv heads of 64, vocab 1024; ``--hidden`` to change), exported twice with
``attnopt.export_decoder`` (target onnxruntime, CPU): ``Fused()`` (exact, GroupQueryAttention,
shared past/present buffer) and ``Linear(feature_map="elu")`` (a ``[8, 64, 64]`` + ``[8, 64, 1]``
state per layer, growing mode: present fed back as past). For each context length the prompt
has that many random tokens and ``--new`` tokens are generated greedily; decode tokens/s is over
the decode steps (prefill excluded). Exact and Linear runs alternate, ``--repeats`` times; the
median is printed. Random weights: speed only, the tokens are meaningless.

    .venv/bin/python benchmarks/bench_decode_linear.py                 # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import attnopt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import transformers as tf

    torch.manual_seed(0)
    heads = args.hidden // 64
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=8, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(args.contexts) + args.new + 8)).eval()
    ids = torch.randint(3, 1024, (1, 16))
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "exact": attnopt.export_decoder(model, {"input_ids": ids}, Path(tmp) / "exact"),
            "linear(elu)": attnopt.export_decoder(
                model, {"input_ids": ids}, Path(tmp) / "linear",
                config=attnopt.Config(variant=attnopt.Linear(feature_map="elu"))),
        }
        print(files["linear(elu)"].table())
        print(f"\n| context | file | cache | prefill ms | decode tokens/s (median of "
              f"{args.repeats}) |\n|---:|---|---|---:|---:|")
        for ctx in args.contexts:
            prompt = torch.randint(3, 1024, (1, ctx))
            runs: dict[str, list] = {name: [] for name in files}
            for _ in range(args.repeats):
                for name, res in files.items():
                    gen = res.generate(prompt, args.new, eos_token_id=None,
                                       threads=args.threads, spin=False)
                    runs[name].append((gen.prefill_s, gen.decode_tokens_per_s,
                                       gen.cache_shapes[-1]))
            for name, r in runs.items():
                shape = "x".join(map(str, r[-1][2][1:]))
                print(f"| {ctx} | {name} | {shape} | "
                      f"{1e3 * statistics.median(x[0] for x in r):.0f} | "
                      f"{statistics.median(x[1] for x in r):.1f} |")


if __name__ == "__main__":
    main()
