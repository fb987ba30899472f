#!/usr/bin/env bash
# Install what the tests need, then run them (CPU only, tiny models, no downloads of weights).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
# two workers (TEST_WORKERS to change); tests sharing torch.distributed's port 29500 stay on one worker
python3 -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
