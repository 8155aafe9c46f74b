"""``attnopt generate`` and ``attnopt export --decoder``, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys


def _attnopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnopt.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_generate_prints_tokens_and_speed_and_keeps_the_directory(tmp_path):
    out = tmp_path / "llama"
    res = _attnopt("generate", "tiny:llama", "--prompt-ids", "5,17,33,8", "--max-new-tokens",
                   "6", "--cache", "growing", "-o", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    tokens = lines[-2].split()
    assert tokens[:4] == ["5", "17", "33", "8"] and len(tokens) == 10
    assert "6 new tokens" in lines[-1] and "tokens/s" in lines[-1]
    assert "GroupQueryAttention" in res.stderr  # the export report
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "llama"
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2


def test_export_decoder_refuses_an_encoder(tmp_path):
    res = _attnopt("export", "tiny:bert", "--decoder", "-o", str(tmp_path / "b"))
    assert res.returncode == 2
    assert "cannot be called as a decoder" in res.stderr
    assert not (tmp_path / "b").exists()
