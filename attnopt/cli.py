"""Command line: ``attnopt inspect|optimize|export <model spec>``.

Model specs are described in ``attnopt.models`` (``tiny:bert``, ``pkg:all-minilm-l6-v2``,
``hf:./local-dir``, ``timm:vit_tiny_patch16_224``, ``my.module:factory``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path

from attnopt.errors import AttnoptError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnopt`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except AttnoptError as e:
        print(f"attnopt: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnopt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (per-site reasons)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("spec", help="model spec, e.g. tiny:bert, pkg:all-minilm-l6-v2, "
                                     "hf:./dir, timm:vit_tiny_patch16_224, my.module:factory")
        sp.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
        sp.add_argument("--seq", type=int, default=32, help="example sequence length (default 32)")
        sp.add_argument("--static", action="store_true", help="capture with static shapes")
        sp.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    def rewriting(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--variant", default="fused", metavar="NAME[:k=v,...]",
                        help="variant for every site, e.g. sliding_window:window=512, "
                             "streaming:sinks=4,window=512, block_topk:block=64,k=8, "
                             "neighborhood2d:kernel=7, linear:feature_map=elu "
                             "(default: fused, exact)")
        sp.add_argument("--exact", action="append", default=[], metavar="GLOB",
                        help="keep the sites whose module path matches GLOB exact (fused); "
                             "repeatable, e.g. --exact 'model.layers.0.*'")

    sp = sub.add_parser("inspect", help="list the attention sites of a model (read-only)")
    common(sp)
    sp.set_defaults(func=_inspect)

    sp = sub.add_parser("optimize", help="fuse every attention, verify, print the report")
    common(sp)
    rewriting(sp)
    sp.set_defaults(func=_optimize)

    sp = sub.add_parser("export", help="optimize, export to ONNX, validate in onnxruntime")
    common(sp)
    rewriting(sp)
    sp.add_argument("-o", "--out", default="out", help="output directory (default ./out)")
    sp.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "onnx"],
                    help="onnxruntime: contrib attention ops; onnx: standard Attention")
    sp.add_argument("--no-fuse", action="store_true", help="skip standard non-attention fusions")
    _triton_options(sp)
    sp.set_defaults(func=_export)

    sp = sub.add_parser("serve", help="start a local Triton server (127.0.0.1) on a model "
                                      "repository or an .onnx file")
    sp.add_argument("model", help="a Triton model repository (attnopt export --triton) or .onnx")
    sp.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    sp.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: free)")
    sp.add_argument("--for", dest="duration", type=float, default=None, metavar="SECONDS",
                    help="stop after SECONDS (default: run until Ctrl-C)")
    sp.set_defaults(func=_serve)
    return p


def _triton_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--triton", metavar="REPO", help="also write a Triton model repository "
                                                     "entry REPO/<name>/ (config.pbtxt + 1/)")
    sp.add_argument("--triton-name", metavar="NAME", help="model name in REPO (default: from "
                                                          "the spec)")
    sp.add_argument("--triton-backend", default="onnxruntime", choices=["onnxruntime", "python"],
                    help="onnxruntime: platform onnxruntime_onnx (NVIDIA's Triton container); "
                         "python: onnxruntime in Triton's Python backend (pip tritonserver)")
    sp.add_argument("--max-batch-size", type=int, default=8,
                    help="Triton max_batch_size; dynamic batching on when > 0 (default 8)")
    sp.add_argument("--instances", type=int, default=1, help="Triton model instances (default 1)")
    sp.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="Triton instance kind: KIND_CPU or KIND_GPU (default cpu)")
    sp.add_argument("--overwrite", action="store_true", help="replace REPO/<name> if present")


def _load(args):
    from attnopt.models import build

    _step(f"loading {args.spec}")
    t0 = time.perf_counter()
    built = build(args.spec, batch=args.batch, seq=args.seq)
    _step(f"loaded {built.description} in {time.perf_counter() - t0:.1f}s")
    return built


def _inspect(args) -> int:
    import attnopt
    from attnopt.report import LEFT_EXACT, Report, SiteResult

    built = _load(args)
    _step("capturing and matching")
    sites = attnopt.find_attention(built.model, built.inputs, dynamic=not args.static)
    report = Report(model=built.description,
                    rows=[SiteResult(s, "found" if s.fusable else LEFT_EXACT, note=s.reason)
                          for s in sites])
    print(report.table())
    _expectation(built, len(sites))
    _write_json(args, report)
    return 0


def _optimize(args) -> int:
    import attnopt

    built = _load(args)
    _step("optimizing: capture -> find -> check each site -> rewrite -> verify end to end")
    fast = attnopt.optimize(built.model, built.inputs, _config(args))
    fast.report.model = built.description
    print(fast.report.table())
    _expectation(built, len(fast.report.rows))
    _write_json(args, fast.report)
    return 0


def _export(args) -> int:
    import attnopt

    built = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.spec.split(":", 1)[-1]) or "model"
    path = out / f"{name}.{args.target}.onnx"
    _step("optimizing: capture -> find -> check each site -> rewrite -> verify end to end")
    fast = attnopt.optimize(built.model, built.inputs, _config(args))
    fast.report.model = built.description
    print(fast.report.table())
    _step(f"exporting to {path} (target {args.target}) and validating in onnxruntime")
    res = attnopt.export_onnx(fast, built.inputs, path, target=args.target,
                              dynamic=not args.static, fuse=not args.no_fuse)
    print(res.report.table())
    print(f"wrote {res.path}")
    if getattr(args, "triton", None):
        _write_triton(args, res, name)
    if args.json:
        data = {"optimize": fast.report.to_dict(), "export": res.report.to_dict()}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def _write_triton(args, res, name: str) -> None:
    from attnopt.serving import write_triton_repository

    model_name = args.triton_name or re.sub(r"[^A-Za-z0-9_-]+", "_", name)
    _step(f"writing Triton model {model_name!r} into {args.triton} "
          f"(backend {args.triton_backend}) and validating its config against Triton's schema")
    m = write_triton_repository(res, args.triton, model_name, backend=args.triton_backend,
                                max_batch_size=args.max_batch_size, instances=args.instances,
                                device=args.device, overwrite=args.overwrite)
    print(f"wrote {m.model_dir}/ (config.pbtxt, 1/); serve it locally with: "
          f"attnopt serve {args.triton}")


def _serve(args) -> int:
    from attnopt.serving import start_server

    _step(f"starting tritonserver (.venv-serve) on {args.model}")
    server = start_server(args.model, http_port=args.port, grpc_port=args.grpc_port)
    try:
        print(f"serving {', '.join(server.models)} at {server.url} (HTTP) and "
              f"{server.grpc_url} (gRPC); try: curl {server.url}/v2/models/"
              f"{server.models[0]}", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while server.alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
        if not server.alive():
            print(f"attnopt: error: tritonserver exited:\n{server.logs()[-2000:]}",
                  file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        _step("tritonserver stopped")
    return 0


def _config(args):
    from attnopt.config import Config
    from attnopt.variants import Fused

    return Config(variant=parse_variant(args.variant),
                  overrides={glob: Fused() for glob in args.exact}, dynamic=not args.static)


def parse_variant(text: str):
    """A variant config from ``name[:key=value,...]`` (values are Python literals or words).

    ``sliding_window:window=512`` → ``SlidingWindow(window=512)``;
    ``neighborhood2d:kernel=7,grid=(14,14)``; ``linear:feature_map=relu``.
    """
    import ast

    from attnopt.errors import ConfigError
    from attnopt.variants import Variant

    name, _, params = text.partition(":")
    data: dict[str, object] = {"variant": name.strip()}
    # split on commas outside parentheses, so tuples such as grid=(14,14) stay whole
    for item in filter(None, re.split(r",(?![^()]*\))", params)):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--variant {text!r}: {item!r} is not key=value")
        try:
            data[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            data[key.strip()] = value.strip()
    try:
        return Variant.from_dict(data)
    except TypeError as e:
        raise ConfigError(f"--variant {text!r}: {e}") from None


def _expectation(built, found: int) -> None:
    if built.expected_sites is not None:
        status = "as expected" if found == built.expected_sites else "MISMATCH"
        print(f"the model's config implies {built.expected_sites} attention layers: "
              f"found {found} ({status})")


def _write_json(args, report) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        _step(f"report written to {args.json}")


def _step(msg: str) -> None:
    print(f"[attnopt] {msg}", file=sys.stderr, flush=True)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[attnopt] %(message)s"))
    log = logging.getLogger("attnopt")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if not verbose:
        # torch's ONNX exporter warns about every torchvision op it cannot register and
        # pytree deprecations: noise for a user who asked for an export, not a problem.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")


if __name__ == "__main__":
    sys.exit(main())
