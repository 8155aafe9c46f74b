"""``attnopt generate`` and ``attnopt export --decoder`` (in-process: the export dominates)."""

from __future__ import annotations

import json

from attnopt.cli import main


def test_generate_prints_tokens_and_speed_and_keeps_the_directory(tmp_path, capsys):
    out = tmp_path / "llama"
    rc = main(["generate", "tiny:llama", "--prompt-ids", "5,17,33,8", "--max-new-tokens", "6",
               "--cache", "growing", "--no-spin", "-o", str(out)])
    res = capsys.readouterr()
    assert rc == 0, res.err
    lines = res.out.strip().splitlines()
    tokens = lines[-2].split()
    assert tokens[:4] == ["5", "17", "33", "8"] and len(tokens) == 10
    assert "6 new tokens" in lines[-1] and "tokens/s" in lines[-1]
    assert "GroupQueryAttention" in res.err  # the export report
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "llama"
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2


def test_export_decoder_refuses_an_encoder(tmp_path, capsys):
    rc = main(["export", "tiny:bert", "--decoder", "-o", str(tmp_path / "b")])
    assert rc == 2
    assert "cannot be called as a decoder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
