"""Command line: ``attnopt inspect|optimize|export <model spec>``, ``attnopt check-trt <file>``.

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
    sp.add_argument("--target", default="onnxruntime",
                    choices=["onnxruntime", "onnx", "tensorrt"],
                    help="onnxruntime: contrib attention ops; onnx: standard Attention; "
                         "tensorrt: standard ONNX TensorRT's parser accepts (checked), plus "
                         "the trtexec / polygraphy commands")
    sp.add_argument("--no-fuse", action="store_true", help="skip standard non-attention fusions")
    sp.add_argument("--tensorrt-version", metavar="X.Y", default=None,
                    help="--target tensorrt: the TensorRT release (default 11.4)")
    sp.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                    help="--target tensorrt: convert the model and export in this precision")
    _triton_options(sp)
    sp.set_defaults(func=_export)

    sp = sub.add_parser("check-trt", help="check an ONNX file against TensorRT's ONNX parser "
                                          "(operator matrix; no GPU needed)")
    sp.add_argument("onnx", help="the .onnx file")
    sp.add_argument("--version", default=None, metavar="X.Y",
                    help="TensorRT release, e.g. 11.4 or 10.15.1 (default 11.4)")
    sp.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    sp.set_defaults(func=_check_trt)

    sp = sub.add_parser("serve", help="start a local Triton server (127.0.0.1) on a model "
                                      "repository or an .onnx file")
    sp.add_argument("model", help="a Triton model repository (attnopt export --triton) or .onnx")
    sp.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    sp.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: free)")
    sp.add_argument("--for", dest="duration", type=float, default=None, metavar="SECONDS",
                    help="stop after SECONDS (default: run until Ctrl-C)")
    sp.set_defaults(func=_serve)
    _decoder_commands(sub, common, rewriting)
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

    if getattr(args, "decoder", False):
        return _export_decoder(args)
    built = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.spec.split(":", 1)[-1]) or "model"
    path = out / f"{name}.{args.target}.onnx"
    model, inputs, trt = built.model, built.inputs, {}
    if args.target == "tensorrt":
        from attnopt.tensorrt import DEFAULT_VERSION
        from attnopt.tensorrt._export import TensorRTTarget

        target = TensorRTTarget(args.tensorrt_version or DEFAULT_VERSION, args.precision)
        model, inputs = target.prepare(model, inputs)  # a converted copy for fp16 / bf16
        trt = {"tensorrt_version": target.version, "precision": args.precision}
    elif args.tensorrt_version or args.precision:
        from attnopt.errors import ConfigError

        raise ConfigError("--tensorrt-version / --precision need --target tensorrt")
    _step("optimizing: capture -> find -> check each site -> rewrite -> verify end to end")
    fast = attnopt.optimize(model, inputs, _config(args))
    fast.report.model = built.description
    print(fast.report.table())
    _step(f"exporting to {path} (target {args.target}) and validating in onnxruntime")
    res = attnopt.export_onnx(fast, inputs, path, target=args.target,
                              dynamic=not args.static, fuse=not args.no_fuse, **trt)
    print(res.report.table())
    print(f"wrote {res.path}")
    if getattr(args, "triton", None):
        _write_triton(args, res, name)
    if args.json:
        data = {"optimize": fast.report.to_dict(), "export": res.report.to_dict()}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def _check_trt(args) -> int:
    """Exit status 0: compatible; 1: TensorRT would refuse the file; 2: bad arguments."""
    from attnopt.tensorrt import DEFAULT_VERSION, check

    result = check(args.onnx, args.version or DEFAULT_VERSION)
    print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1

# -- decoder LLMs: KV-cache export and generation ------------------------------------------------


def _decoder_commands(sub, common, rewriting) -> None:
    """``export --decoder`` options and the ``generate`` command."""
    sp = sub.choices["export"]
    sp.add_argument("--decoder", action="store_true",
                    help="causal LM: export one KV-cache graph for prefill and decode "
                         "(model.onnx + genai_config.json ...) into the -o directory")
    sp.add_argument("--max-length", type=int, default=None,
                    help="--decoder: search.max_length in genai_config.json")

    sp = sub.add_parser("generate", help="export a causal LM with a KV cache, generate text "
                                         "in onnxruntime, print it and tokens/s")
    common(sp)
    rewriting(sp)
    sp.add_argument("--prompt", default="Attention is", help="the prompt text")
    sp.add_argument("--prompt-ids", default=None, metavar="ID,ID,...",
                    help="token ids instead of text (for models without a tokenizer)")
    sp.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    sp.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "onnx"])
    sp.add_argument("--cache", default=None, choices=["shared", "growing"],
                    help="cache mode (default: shared for onnxruntime, growing for onnx)")
    sp.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    sp.add_argument("--no-spin", action="store_true",
                    help="idle onnxruntime threads sleep instead of busy-waiting (faster on "
                         "cores shared with other work)")
    sp.add_argument("-o", "--out", default=None,
                    help="keep the exported directory here (default: a temporary one)")
    sp.set_defaults(func=_generate)


def _export_decoder(args) -> int:
    import attnopt

    built = _load(args)
    _step(f"exporting a KV-cache decoder to {args.out} (target {args.target}) and validating "
          "prefill + decode in onnxruntime")
    res = attnopt.export_decoder(built.model, built.inputs, args.out, target=args.target,
                                 config=_config(args), tokenizer=built.tokenizer,
                                 max_length=args.max_length, fuse=not args.no_fuse)
    print(res.table())
    print(f"wrote {', '.join(res.files)} to {res.out_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "sites": [s.to_dict() for s in res.sites], "parity": res.parity,
            "notes": res.notes, "files": res.files, "timings_s": res.timings}, indent=2))
    return 0


def _generate(args) -> int:
    import tempfile

    import attnopt
    from attnopt.errors import ConfigError

    built = _load(args)
    tok = built.tokenizer
    if args.prompt_ids:
        try:
            ids = [[int(t) for t in args.prompt_ids.split(",")]]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: expected integers separated "
                              "by commas") from None
    elif tok is None:
        raise ConfigError(f"{args.spec} has no tokenizer: pass --prompt-ids 5,17,33")
    else:
        ids = tok([args.prompt], return_tensors="pt").input_ids.tolist()
    with tempfile.TemporaryDirectory(prefix="attnopt-decoder-") as tmp:
        out = args.out or Path(tmp) / "model"
        _step(f"exporting a KV-cache decoder (target {args.target})")
        res = attnopt.export_decoder(built.model, built.inputs, out, target=args.target,
                                     config=_config(args), tokenizer=tok)
        print(res.table(), file=sys.stderr)
        _step(f"generating {args.max_new_tokens} tokens")
        gen = res.generate(ids, args.max_new_tokens, cache=args.cache, threads=args.threads,
                           spin=not args.no_spin)
    new = gen.sequences[0, len(ids[0]):].tolist()
    text = tok.decode(gen.sequences[0], skip_special_tokens=True) if tok is not None and \
        not args.prompt_ids else " ".join(map(str, gen.sequences[0].tolist()))
    print(text)
    print(f"[{len(new)} new tokens; prefill {gen.prefill_s * 1e3:.1f} ms, decode "
          f"{gen.decode_tokens_per_s:.1f} tokens/s]")
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
