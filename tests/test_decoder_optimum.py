"""Interop: Hugging Face Optimum's ORTModelForCausalLM runs attnopt's exported decoder directory.

optimum-onnx pins transformers<4.58 and attnopt needs transformers 5, so Optimum lives in its own
environment, .venv-optimum (scripts/setup_optimum.sh, which scripts/test.sh runs), and
scripts/optimum_generate.py runs there in a subprocess: greedy ``generate()`` on the directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import left_padded_prompt

import attnopt

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv-optimum" / "bin" / "python"
SCRIPT = ROOT / "scripts" / "optimum_generate.py"
VOCAB, PROMPT, NEW, PAD = 120, 12, 10, 3

pytestmark = pytest.mark.skipif(
    not PYTHON.exists(),
    reason=f"{PYTHON.relative_to(ROOT)} does not exist: run scripts/setup_optimum.sh "
           "(Hugging Face Optimum needs transformers<4.58, so it has its own environment)")


def _tiny(arch: str):
    """Tiny GQA decoder; initializer_range 0.1 so greedy tokens vary (0.02 repeats one token).

    Mistral's sliding window (6) is shorter than the prompt, so the window matters."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.1, attn_implementation="eager")
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=6, **common)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()



def _optimum_generate(model_dir: Path, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of this environment's packages in the other venv
    proc = subprocess.run(
        [str(PYTHON), str(SCRIPT), str(model_dir), "--ids", json.dumps(ids.tolist()),
         "--mask", json.dumps(mask.tolist()), "--new", str(NEW)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch, target, op", [("llama", "onnxruntime", "GroupQueryAttention"),
                                              ("llama", "onnx", "Attention"),
                                              ("mistral", "onnxruntime", "GroupQueryAttention")])
def test_optimum_runs_the_directory_with_the_same_tokens(tmp_path, arch, target, op):
    """Same greedy tokens as HF generate and attnopt's runner; logits within 1e-4 of HF.

    Batch 2 with a left-padded row, growing past (optimum feeds ``present`` back as the past)."""
    model = _tiny(arch)
    ids, mask = left_padded_prompt(VOCAB, PROMPT, PAD)
    res = attnopt.export_decoder(model, {"input_ids": ids}, tmp_path / target, target=target)
    graph = onnx.load(str(res.path), load_external_data=False).graph
    assert op in {n.op_type for n in graph.node}

    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    own = res.generate(ids, NEW, attention_mask=mask)
    out = _optimum_generate(res.out_dir, ids, mask)
    print(json.dumps(out["versions"]), file=sys.stderr)

    seq = np.array(out["sequences"])
    assert np.array_equal(seq, ref.sequences.numpy()), (seq, ref.sequences)
    assert np.array_equal(seq, own.sequences), (seq, own.sequences)
    assert len(set(seq[:, PROMPT:].ravel().tolist())) > 3  # not one repeated token
    assert len(out["logits"]) == len(ref.logits) == NEW
    for r, o in zip(ref.logits, out["logits"]):
        r = r.double().numpy()
        assert np.abs(r - np.array(o)).max() / np.abs(r).max() <= 1e-4
