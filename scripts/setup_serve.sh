#!/usr/bin/env bash
# Creates .venv-serve: the environment of the local Triton server (nvidia-pytriton's bundled
# tritonserver + Python backend, onnxruntime, tritonclient). Idempotent and fast when built: it
# reinstalls only when requirements/serve.txt or this script changed since the last success.
#
# Its own environment because nvidia-pytriton pins numpy<2 and needs glibc >= 2.35. It is built
# from the system interpreter so the backend stub (linked against libpython3.X) can load the same
# libpython as the venv's python; the launcher also puts that interpreter's LIBDIR on
# LD_LIBRARY_PATH. Where glibc is older, it prints why and exits 0 (the serving tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${SERVE_PYTHON:-python3}"
VENV=".venv-serve"
STAMP="$VENV/.attnopt-serve-stamp"
want="$(cat requirements/serve.txt scripts/setup_serve.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

glibc="$(ldd --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+$' || echo 0.0)"
if [[ "$(printf '%s\n2.35\n' "$glibc" | sort -V | head -1)" != "2.35" ]]; then
  echo "attnopt setup_serve: glibc $glibc < 2.35: nvidia-pytriton's tritonserver cannot run" \
       "here; skipping $VENV (the local-server tests skip, config writing still works)" >&2
  exit 0
fi

echo "attnopt setup_serve: creating $VENV (tritonserver via nvidia-pytriton, ~1 minute) ..." >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements/serve.txt
"$VENV/bin/python" - <<'PY'
import pytriton, onnxruntime, tritonclient.http, tritonclient.grpc, numpy
from pathlib import Path
assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
server = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
assert server.is_file(), f"no tritonserver binary at {server}"
PY
echo "$want" > "$STAMP"
echo "attnopt setup_serve: done" >&2
