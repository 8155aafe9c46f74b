"""The command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _attnopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnopt.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_inspect_lists_sites(tmp_path):
    out = tmp_path / "r.json"
    res = _attnopt("inspect", "tiny:llama", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "model.layers.1.self_attn" in res.stdout
    assert "found 2 (as expected)" in res.stdout
    data = json.loads(out.read_text())
    assert [s["kv_heads"] for s in data["sites"]] == [2, 2]


def test_optimize_prints_report_and_verifies(tmp_path):
    out = tmp_path / "r.json"
    res = _attnopt("optimize", "tiny:whisper", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "6 attention sites: 6 fused" in res.stdout
    data = json.loads(out.read_text())
    assert len(data["end_to_end"]) == 2
    assert all(e["rel"] < 1e-4 for e in data["end_to_end"].values())
    assert "capture" in res.stderr  # progress lines with timings


def test_bad_spec_is_a_clear_error():
    res = _attnopt("inspect", "tiny:nonsense")
    assert res.returncode == 2
    assert "unknown tiny model" in res.stderr


def test_optimize_with_a_variant_and_an_exact_layer(tmp_path):
    out = tmp_path / "r.json"
    res = _attnopt("optimize", "tiny:llama", "--variant", "sliding_window:window=8",
                   "--exact", "*layers.0.*", "--json", str(out))
    assert res.returncode == 0, res.stderr
    sites = json.loads(out.read_text())["sites"]
    assert [s["variant"] for s in sites] == ["fused", "SlidingWindow(window=8)"]
    assert sites[0]["error"]["rel"] < 1e-4
    assert 0 < sites[1]["density"] < 1 and sites[1]["error"]["rel"] > 1e-4  # approximate, measured


def test_bad_variant_is_a_clear_error():
    res = _attnopt("optimize", "tiny:llama", "--variant", "sliding_window:windw=8")
    assert res.returncode == 2
    assert "unexpected keyword argument 'windw'" in res.stderr



def _run(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (much faster than a subprocess): exit code, stdout, stderr."""
    from attnopt.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: --version, --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    """Run in ``tmp_path`` with sys.path as the installed console script sees it (no cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    return tmp_path


FACTORIES = """
import pathlib
import torch

class Attn(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x @ x.transpose(-1, -2) * 0.25, -1) @ x

def build():
    pathlib.Path("built.marker").write_text("loaded")
    return Attn(), (torch.randn(2, 8, 16),)
"""


def test_version_and_help_explain_every_option(capsys):
    import argparse

    from attnopt.cli import _parser

    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("attnopt 0.")
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"inspect", "optimize", "export"}
    for name, sp in sub.choices.items():
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.nargs != 0 and action.choices is None:
                assert "e.g." in action.help, f"{name} {action.option_strings}: no example"
        code, text, _ = _run(capsys, name, "--help")
        assert code == 0 and f"example:\n  attnopt {name} " in text


def test_factory_from_the_current_directory_and_options_checked_first(capsys, in_dir):
    (in_dir / "my_models.py").write_text(FACTORIES)
    code, _, err = _run(capsys, "optimize", "my_models:build", "--variant", "nope")
    assert code == 2 and "unknown variant" in err
    code, _, err = _run(capsys, "export", "my_models:build", "-o", "missing/m.onnx")
    assert code == 2 and "does not exist" in err
    assert not (in_dir / "built.marker").exists(), "option errors must come before loading"
    code, _, err = _run(capsys, "optimize", "my_models:build", "--seq", "64")
    assert code == 2 and "--seq cannot be applied" in err
    code, _, err = _run(capsys, "optimize", "my_models:build", "--exact", "layers.*")
    assert code == 2 and "matches no attention site" in err
    code, out, err = _run(capsys, "optimize", "my_models:build")
    assert code == 0, err
    assert "1 attention sites: 1 fused" in out


def test_export_to_a_file_name_writes_hf_files_beside_it(capfd, in_dir):
    code, out, err = _run(capfd, "export", "tiny:bert", "--static", "--seq", "8", "-o",
                          "bert.onnx", "--no-fuse", "--triton", "repo", "--max-batch-size", "0")
    assert code == 0, err
    assert (in_dir / "bert.onnx").is_file() and not (in_dir / "bert.onnx.onnx").exists()
    assert json.loads((in_dir / "config.json").read_text())["model_type"] == "bert"
    assert "torchvision" not in err and "LeafSpec" not in err
    # --triton: a model directory whose config passes Triton's schema and matches the file
    # (max_batch_size 0: a --static file has a fixed batch dim, which Triton cannot batch)
    from attnopt.serving import check_model_dir

    config = check_model_dir(in_dir / "repo" / "bert")
    assert config.max_batch_size == 0 and config.platform == "onnxruntime_onnx"  # --static
    assert [t.name for t in config.input] == ["input_ids", "attention_mask"]
    assert (in_dir / "repo" / "bert" / "1" / "model.onnx").read_bytes() == \
        (in_dir / "bert.onnx").read_bytes()


def test_export_for_tensorrt_writes_the_file_and_its_build_commands(capfd, in_dir):
    from attnopt.tensorrt import check

    code, out, err = _run(capfd, "export", "tiny:bert", "--target", "tensorrt", "-o", "out")
    assert code == 0, err
    path = in_dir / "out" / "bert.tensorrt.onnx"
    assert path.is_file() and "wrote out/bert.tensorrt.onnx" in out
    assert check(path, "11.4").ok
    text = (in_dir / "out" / "bert.tensorrt.trt.txt").read_text()
    assert f"trtexec --onnx={path.name}" in text and "--stronglyTyped" in text
    assert "polygraphy run" in text and "--trt --onnxrt" in text


def test_save_option(capsys, in_dir):
    import attnopt

    code, _, err = _run(capsys, "optimize", "tiny:bert", "--seq", "8", "--save", "fast.pt2")
    if hasattr(attnopt, "save"):
        assert code == 0, err
        assert attnopt.load(in_dir / "fast.pt2").report.count("fused") == 2
    else:
        assert code == 2 and "attnopt.save" in err
        assert "loading" not in err  # refused before loading the model
