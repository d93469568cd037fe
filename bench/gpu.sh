#!/usr/bin/env bash
# Loft's training engine on a GPU: throughput, peak memory against the planner, MFU.
# See bench/gpu_engine.py's docstring for what it measures.
#
#   bash bench/gpu.sh                 # default sizes (under 10 minutes on an H100)
#   bash bench/gpu.sh --dry-run       # every step on tiny sizes, on a CPU in seconds
#   PYTHON=/opt/venv/bin/python bash bench/gpu.sh --out /tmp/gpu.json
#
# Needs only engine/ and bench/ from the repository, and torch, transformers, peft,
# safetensors and jinja2 (bitsandbytes for QLoRA) in the Python it runs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# $PYTHON when given, else the repository's virtual environment when there is one, else python3.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# The machine reaches no network: transformers, peft and bitsandbytes must not try the hub
# (bitsandbytes looks for kernels there as it loads), and fail at once if they would.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

"$PYTHON" - <<'EOF'
import importlib
import sys

missing = []
for name in ("torch", "transformers", "peft", "safetensors", "jinja2"):
    try:
        module = importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
    else:
        print(f"{name} {getattr(module, '__version__', '?')}", end="  ")
print(f"python {sys.version.split()[0]}")
if missing:
    sys.exit(f"{sys.executable} cannot import: {'; '.join(missing)}. Set PYTHON to one that can.")
EOF

exec "$PYTHON" bench/gpu_engine.py "$@"
