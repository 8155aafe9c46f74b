"""End to end: exported models served by a real tritonserver, requests by tritonclient.

The server is the one bundled with nvidia-pytriton, in ``.venv-serve`` (scripts/setup_serve.sh,
called by scripts/test.sh); it needs glibc >= 2.35. A tiny BERT is written as an ONNX Runtime
repository entry (served through its Python-backend twin) and a tiny ViT as a Python-backend
entry; outputs must equal torch's within the export tolerance, and the statistics must show the
dynamic batcher merging concurrent requests.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

import attnopt
from attnopt.models import build
from attnopt.serving import DynamicBatching, client, start_server, write_triton_repository
from attnopt.serving.launcher import MIN_GLIBC, find_serve_env, glibc_version

_glibc = glibc_version()
pytestmark = pytest.mark.skipif(
    _glibc is not None and _glibc < MIN_GLIBC,
    reason=f"glibc {_glibc} < 2.35: nvidia-pytriton's tritonserver cannot run here")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    find_serve_env()  # fails (not skips) with "run scripts/setup_serve.sh" when it is missing
    out = tmp_path_factory.mktemp("serve")
    models = {}
    for arch in ("bert", "vit"):
        built = build(f"tiny:{arch}", batch=2, seq=8)
        res = attnopt.export_onnx(built.model, built.inputs, out / f"{arch}.onnx")
        models[arch] = (built, res)
    return out, models


def _bert_request(seq: int, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (1, seq), generator=g)
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, seq - 2:] = seed % 2  # every other request has padding
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _vit_request(seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g).numpy()}


def _check(built, res, requests, outputs) -> float:
    worst = 0.0
    for request, got in zip(requests, outputs):
        with torch.no_grad():
            ref = built.model(**{k: torch.from_numpy(v) for k, v in request.items()})
        assert sorted(got) == sorted(res.output_names)
        for name in res.output_names:
            r = getattr(ref, name)
            err = (torch.from_numpy(got[name]) - r).abs().max() / r.abs().max()
            worst = max(worst, err.item())
    assert worst <= res.report.tolerance, (worst, res.report.tolerance)
    return worst


def test_triton_serves_bert_and_vit_with_dynamic_batching(exported):
    out, models = exported
    repo = out / "repo"
    # a queue delay long enough for a loaded CI machine to get the concurrent requests in
    batching = DynamicBatching(max_queue_delay_us=20_000)
    write_triton_repository(models["bert"][1], repo, "bert",  # onnxruntime_onnx → twin
                            dynamic_batching=batching)
    write_triton_repository(models["vit"][1], repo, "vit", backend="python",
                            max_batch_size=16, dynamic_batching=batching)
    server = start_server(repo)
    try:
        assert sorted(server.models) == ["bert", "vit"]
        for arch, make in (("bert", lambda i: _bert_request(8, i)), ("vit", _vit_request)):
            built, res = models[arch]
            single = [make(100)]
            outputs, _ = client.infer(server, arch, single)
            _check(built, res, single, outputs)
            assert outputs[0][res.output_names[0]].shape[0] == 1

            many = [make(i) for i in range(16)]
            if arch == "bert":  # other lengths are grouped apart inside one batch
                many += [_bert_request(5, 50), _bert_request(5, 51)]
            outputs, info = client.infer(server, arch, many, concurrency=8)
            _check(built, res, many, outputs)
            requests = info["after"]["requests"] - info["before"]["requests"]
            executions = info["after"]["executions"] - info["before"]["executions"]
            assert requests == len(many) and info["after"]["failed"] == 0
            assert executions < requests, f"{arch}: no batching ({executions} executions)"
    finally:
        code = server.stop()
    assert not server.alive() and code is not None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.http_port)) != 0, "port still served"


def test_serve_a_bare_onnx_file(exported):
    out, models = exported
    built, res = models["vit"]
    with start_server(res.path) as server:
        assert server.models == ["vit"]
        request = [_vit_request(7)]
        outputs, _ = client.infer(server, "vit", request)
        _check(built, res, request, outputs)
        stats = server.statistics("vit")["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 1
    assert not server.alive()


def test_cli_serve_starts_and_stops(tmp_path, capsys):
    from test_serving import _onnx

    from attnopt.cli import main

    path = _onnx(tmp_path / "tiny.onnx")
    assert main(["serve", str(path), "--for", "0.5"]) == 0
    out = capsys.readouterr()
    assert "serving tiny at http://127.0.0.1:" in out.out
    assert "tritonserver stopped" in out.err
    assert main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert "neither a model repository nor an .onnx file" in capsys.readouterr().err
