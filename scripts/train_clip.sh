#!/usr/bin/env bash
# Train the CLIP of the project (open_clip, on your own images and captions: no weights are
# downloaded). With no arguments: on the embedded default data set ($DATA_DIR/synthetic, made by
# ./scripts/preprocess.sh) with its text tokenizer, written to $DATA_DIR/clip.pt; held-out
# retrieval and the loss go to TensorBoard ($DATA_DIR/runs/clip). Re-running resumes an
# interrupted training and keeps a finished one.
#
# Your own data: INPUT=/path/to/folder_or.tsv_or.jsonl_or.lmdb ./scripts/train_clip.sh
# Extra arguments go to python -m megatron_t2i.cli.train_clip (e.g. --clip-steps 4000).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

usage() {
  script_help 9
  cat <<'EOF2'

Environment variables (defaults in brackets):
  DATA_DIR        where preprocess.sh wrote the embedded default [./data]
  INPUT           images with captions, or a token data set [$DATA_DIR/synthetic]
  TEXT_TOKENIZER  SentencePiece model [$DATA_DIR/text.model]
  CLIP            the CLIP checkpoint written [$DATA_DIR/clip.pt]
  IMAGE_SIZE      image side in pixels [36]
  CLIP_STEPS      optimiser steps of 128 pairs [3000: about 7 minutes on 2 CPU cores]
  NUM_PROCESSES   data-parallel processes (torchrun) [1]
EOF2
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }

DATA_DIR=${DATA_DIR:-$ROOT/data}
INPUT=${INPUT:-$DATA_DIR/synthetic}
TEXT_TOKENIZER=${TEXT_TOKENIZER:-$DATA_DIR/text.model}
CLIP=${CLIP:-$DATA_DIR/clip.pt}
IMAGE_SIZE=${IMAGE_SIZE:-36}
CLIP_STEPS=${CLIP_STEPS:-3000}
NUM_PROCESSES=${NUM_PROCESSES:-1}

[[ -e "$INPUT" && -f "$TEXT_TOKENIZER" ]] || {
  echo "train_clip.sh: no $INPUT or $TEXT_TOKENIZER; run ./scripts/preprocess.sh first" >&2; exit 2; }
args=(--input "$INPUT" --text-tokenizer "$TEXT_TOKENIZER" --clip "$CLIP" --image-size "$IMAGE_SIZE"
      --clip-steps "$CLIP_STEPS" --tensorboard-dir "$DATA_DIR/runs/clip")
if (( NUM_PROCESSES > 1 )); then
  (( $(gpu_count) > 0 )) || share_cpu_cores "$NUM_PROCESSES"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NUM_PROCESSES" \
    -m megatron_t2i.cli.train_clip "${args[@]}" "$@"
else
  "$PY" -m megatron_t2i.cli.train_clip "${args[@]}" "$@"
fi
