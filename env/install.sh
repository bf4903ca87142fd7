#!/usr/bin/env bash
# Install everything megatron_t2i needs on a fresh machine (CPU or GPU): the pinned Python packages
# and the project itself in editable mode. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -e .
