#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup_serve.sh  # the local tritonserver of tests/test_serving_e2e.py (own venv)
scripts/setup_optimum.sh  # Optimum's ORTModelForCausalLM of tests/test_decoder_optimum.py (own venv)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Fresh memory is slow to touch on these VMs (page faults, see README); keep freed memory.
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824
exec .venv/bin/python -m pytest "$@"
