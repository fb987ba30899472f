#!/usr/bin/env bash
# The whole two-stage job on tiny random models and a synthetic dataset, on CPU (a few minutes).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 -m diffueraser.demo --out "${DEMO_OUT:-demo_out}" "$@"
