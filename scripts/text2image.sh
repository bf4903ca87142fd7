#!/usr/bin/env bash
# Generate images from text with a trained model. With no arguments: the demo checkpoint that
# ./scripts/pretrain_single_node.sh writes (checkpoints/demo), queries typed at a prompt
# (`stop` or Ctrl-D ends), images written under ./samples/.
#
# Extra arguments go to generate_samples.py and win over the defaults, e.g.
#   ./scripts/text2image.sh --input-source queries.txt --batch-size 8 --cfg-scale 2
#   ./scripts/text2image.sh --load checkpoints/run1 --task completion --input-source pairs.tsv
# A checkpoint saved at tensor-parallel size N runs as N processes under torchrun.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

usage() {
  script_help 9
  cat <<'EOF'

Environment variables (defaults in brackets):
  MP_SIZE      tensor-parallel size [the checkpoint's]
  NUM_GPUS     processes to start; must equal MP_SIZE [MP_SIZE]
  MASTER_PORT  rendezvous port under torchrun [29510]
Every flag: python generate_samples.py --help
EOF
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }

LOAD=$ROOT/checkpoints/demo
prev=""
for arg in "$@"; do  # the checkpoint the run will use (the last --load wins, as in argparse)
  [[ "$prev" == "--load" ]] && LOAD=$arg
  [[ "$arg" == --load=* ]] && LOAD=${arg#--load=}
  prev=$arg
done

if [[ -f "$LOAD/meta.json" ]]; then
  meta=$LOAD/meta.json
elif [[ -f "$LOAD/latest" ]]; then
  meta=$LOAD/$(cat "$LOAD/latest")/meta.json
else
  echo "text2image.sh: no checkpoint in $LOAD; train the demo model with" \
       "./scripts/pretrain_single_node.sh (it writes checkpoints/demo) or pass --load DIR" >&2
  exit 2
fi
saved_tp=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tensor_model_parallel_size"])' \
  "$meta" 2>/dev/null) || { echo "text2image.sh: cannot read tensor_model_parallel_size from $meta" >&2; exit 2; }
MP_SIZE=${MP_SIZE:-$saved_tp}
NUM_GPUS=${NUM_GPUS:-$MP_SIZE}
if (( NUM_GPUS != MP_SIZE )); then
  echo "text2image.sh: NUM_GPUS=$NUM_GPUS must equal MP_SIZE=$MP_SIZE (generation runs one process" \
       "per tensor-parallel rank)" >&2
  exit 2
fi

args=(--load "$LOAD" --input-source interactive --output-path "$ROOT/samples")
if (( NUM_GPUS == 1 )); then
  exec "$PY" generate_samples.py "${args[@]}" "$@"
fi
(( $(gpu_count) > 0 )) || share_cpu_cores "$NUM_GPUS"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" \
  --master_port "${MASTER_PORT:-29510}" generate_samples.py "${args[@]}" "$@"
