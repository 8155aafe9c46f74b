"""Greedy generation with Hugging Face Optimum's ORTModelForCausalLM on an exported directory.

Runs inside .venv-optimum (scripts/setup_optimum.sh: optimum-onnx with transformers 4.57), so it
is standalone: it does not import attnopt, which needs transformers 5. tests/test_decoder_optimum.py
calls it on a directory written by ``attnopt.export_decoder``.

    .venv-optimum/bin/python scripts/optimum_generate.py DIR --ids '[[5, 9, 17]]' --new 10
    [--mask '[[1, 1, 1]]'] [--io-binding]

Prints one JSON object: ``sequences`` (prompt + new tokens per row), ``logits`` (per new token:
batch x vocab), ``file``, ``versions``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, generate, print the JSON line; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--ids", required=True, help="prompt token ids, a JSON list of lists")
    p.add_argument("--mask", help="attention mask, a JSON list of lists (default: all ones)")
    p.add_argument("--new", type=int, default=10, help="tokens to generate")
    p.add_argument("--file-name", default="model.onnx")
    p.add_argument("--io-binding", action="store_true")
    a = p.parse_args(argv)

    import onnxruntime
    import optimum.version
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(a.model_dir, file_name=a.file_name, use_cache=True,
                                                use_io_binding=a.io_binding,
                                                local_files_only=True)
    ids = torch.tensor(json.loads(a.ids), dtype=torch.long)
    mask = (torch.tensor(json.loads(a.mask), dtype=torch.long) if a.mask
            else torch.ones_like(ids))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new,
                             do_sample=False, num_beams=1,
                             output_logits=True, return_dict_in_generate=True)
    try:
        from importlib.metadata import version
        onnx_pkg = version("optimum-onnx")
    except Exception:  # noqa: BLE001 - only informative
        onnx_pkg = None
    json.dump({"sequences": out.sequences.tolist(), "file": a.file_name,
               "logits": [lg.float().tolist() for lg in out.logits],
               "versions": {"optimum": optimum.version.__version__, "optimum-onnx": onnx_pkg,
                            "transformers": transformers.__version__,
                            "onnxruntime": onnxruntime.__version__,
                            "torch": torch.__version__}}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
