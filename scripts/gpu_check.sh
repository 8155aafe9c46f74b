#!/usr/bin/env bash
# The one GPU check of issue 16, for a borrowed CUDA machine with torch preinstalled (no network):
#   bash scripts/gpu_check.sh OUTDIR
# installs attnopt without dependencies (the machine's torch, onnx, onnxscript... are used), checks
# that it imports, then runs benchmarks/bench_gpu.py: pytest -m gpu, fused / sparse / linear vs
# baselines, a CPU test subset on this torch. Everything lands in OUTDIR (gpu_results.md/.json,
# pytest_gpu.txt, pytest_cpu.txt, gpu_check.log); the whole run takes about 7-7.5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-400}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

echo "== install (no deps, no build isolation: nothing can be downloaded there)"
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . -q; then
    echo "!! pip install -e . failed; using the source tree on PYTHONPATH instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== versions and import"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! "$PY" - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "numpy", "transformers", "pytest"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name} MISSING ({type(e).__name__}: {e})")
import attnopt
print("attnopt imports from", attnopt.__file__)
PY
then
    echo "!! import attnopt FAILED (see above): the benchmark cannot run"
    exit 3
fi

LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
echo "== bench_gpu.py (budget ${LEFT} s)"
# GPU_CHECK_ARGS: extra arguments, e.g. "--cpu-smoke" to try this script without a GPU.
timeout $(( LEFT + 60 )) "$PY" benchmarks/bench_gpu.py "$OUT" --budget-s "$LEFT" ${GPU_CHECK_ARGS:-}
rc=$?
echo "== done in $(( $(date +%s) - START )) s (bench rc=$rc)"
exit $rc
