#!/usr/bin/env bash
# A web page over the trained models: type a prompt (English or Chinese), pick the checkpoint, its
# generator and the sampling settings, see the samples best first and download the PNGs; compare
# two checkpoints on the same prompt and seeds. With no arguments it serves the quickstart's
# checkpoints (checkpoints/demo, checkpoints/clip-gen) on http://127.0.0.1:7860.
#   ./scripts/web_demo.sh --load checkpoints/run1 --load checkpoints/run2 --port 8080
#   ./scripts/web_demo.sh --host 0.0.0.0      # reachable from other machines
# Every flag: ./scripts/web_demo.sh --help (python -m megatron_t2i.cli.web_demo).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

exec "$PY" -m megatron_t2i.cli.web_demo "$@"
