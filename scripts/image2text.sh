#!/usr/bin/env bash
# Caption images with a caption model (trained with --tasks image2text, e.g. text2image:1,image2text:1).
# With no arguments: the first images of the embedded default data set, captioned by
# ./checkpoints/demo with beam search; captions printed and written to $OUTPUT_PATH/captions.tsv
# (a new captions-N.tsv when one exists).
#
# Your own images: INPUT_SOURCE=list.txt ./scripts/image2text.sh   (one image path per line;
# id<TAB>path with --with-id). Extra arguments go to generate_samples.py, e.g. --beam-size 0
# --batch-size 4 --top-k 20 to sample 4 captions per image.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

usage() {
  script_help 9
  cat <<'HELP'

Environment variables (defaults in brackets):
  LOAD           checkpoint folder [./checkpoints/demo]
  INPUT_SOURCE   file of image paths, or 'interactive' [the first $NUM_IMAGES of $DATA_DIR/synthetic]
  NUM_IMAGES     images taken from the embedded default [8]
  DATA_DIR       where preprocess.sh wrote the embedded default [./data]
  OUTPUT_PATH    output folder [./samples/image2text]
  BEAM_SIZE      beams (1: greedy; 0: sample --batch-size captions) [4]
Launching (MP_SIZE, NUM_GPUS, MASTER_PORT): see ./scripts/text2image.sh --help
HELP
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }

source "$ROOT/scripts/lib/synthetic.sh"
LOAD=${LOAD:-$ROOT/checkpoints/demo}
DATA_DIR=${DATA_DIR:-$ROOT/data}
NUM_IMAGES=${NUM_IMAGES:-8}
OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/image2text}
BEAM_SIZE=${BEAM_SIZE:-4}
INPUT_SOURCE=${INPUT_SOURCE:-}

mkdir -p "$OUTPUT_PATH"
if [[ -z "$INPUT_SOURCE" ]]; then
  INPUT_SOURCE=$OUTPUT_PATH/inputs.txt
  first_synthetic_images image2text.sh "$DATA_DIR/synthetic" "$NUM_IMAGES" > "$INPUT_SOURCE"
fi

args=(--task image2text --load "$LOAD" --input-source "$INPUT_SOURCE"
      --output-path "$OUTPUT_PATH" --beam-size "$BEAM_SIZE")
# text2image.sh finds the checkpoint's tensor-parallel size and launches as many processes
exec "$ROOT/scripts/text2image.sh" "${args[@]}" "$@"
