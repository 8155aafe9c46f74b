#!/usr/bin/env bash
# Creates .venv-optimum: Hugging Face Optimum (optimum-onnx's ORTModelForCausalLM) with onnxruntime,
# for tests/test_decoder_optimum.py, which runs attnopt's exported decoder directory there through
# scripts/optimum_generate.py. Idempotent and fast when built: it reinstalls only when
# requirements/optimum.txt or this script changed since the last success.
#
# Its own environment because optimum-onnx pins transformers<4.58 and attnopt needs transformers 5.
# torch is pinned to the CPU build on disk (requirements/constraints.txt). Where the environment
# cannot be built, it prints why and exits 0 (the optimum test skips).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${OPTIMUM_PYTHON:-python3}"
VENV=".venv-optimum"
STAMP="$VENV/.attnopt-optimum-stamp"
want="$(cat requirements/optimum.txt requirements/constraints.txt scripts/setup_optimum.sh \
        | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
  echo "attnopt setup_optimum: $PYTHON is missing or older than 3.9; skipping $VENV" \
       "(the optimum interop test skips)" >&2
  exit 0
fi

echo "attnopt setup_optimum: creating $VENV (optimum-onnx + transformers 4.57, ~1 minute) ..." >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "${PIP[@]}" -c requirements/constraints.txt torch==2.13.0 \
   || ! "${PIP[@]}" -c requirements/constraints.txt -r requirements/optimum.txt; then
  echo "attnopt setup_optimum: pip could not install requirements/optimum.txt; skipping $VENV" \
       "(the optimum interop test skips)" >&2
  exit 0
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, onnxruntime
from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
assert transformers.__version__.startswith("4."), transformers.__version__
PY
echo "$want" > "$STAMP"
echo "attnopt setup_optimum: done" >&2
