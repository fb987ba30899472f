#!/usr/bin/env bash
# Install what the tests need, then run them (CPU only, tiny models, no downloads of weights).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 -m pytest -q "$@"
