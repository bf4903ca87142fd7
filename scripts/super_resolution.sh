#!/usr/bin/env bash
# Super-resolution: images of S px become 2S px (their g x g codes become 2g x 2g codes, sampled in
# 9 overlapping windows) by a model trained for it. Train one on the embedded default at 32 px
# (half an image needs an even code grid; the demo's 36 px give 9x9):
#   DATA_DIR=data-sr IMAGE_SIZE=32 ./scripts/preprocess.sh --sr-low-res
#   DATA_DIR=data-sr SAVE=checkpoints/demo-sr ./scripts/pretrain_single_node.sh --tasks text2image:1,super-resolution:1
# With no arguments: the first images of $DATA_DIR/synthetic (DATA_DIR=data-sr for the above) with
# their captions, by ./checkpoints/demo-sr; PNGs in $OUTPUT_PATH/{caption}/. Extra arguments go to generate_samples.py.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

usage() {
  script_help 8
  cat <<'HELP'

Environment variables (defaults in brackets):
  LOAD           checkpoint fine-tuned with --tasks super-resolution [./checkpoints/demo-sr]
  INPUT_SOURCE   file of text<TAB>image_path lines, or 'interactive' [made from $DATA_DIR/synthetic]
  NUM_IMAGES     images taken from the embedded default [4]
  DATA_DIR       where preprocess.sh wrote the embedded default [./data]
  OUTPUT_PATH    output folder [./samples/super_resolution]
  BATCH_SIZE     samples per image [1]
  TEMPERATURE    sampling temperature [1.02]
Launching (MP_SIZE, NUM_GPUS, MASTER_PORT): see ./scripts/text2image.sh --help
HELP
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }

source "$ROOT/scripts/lib/synthetic.sh"
LOAD=${LOAD:-$ROOT/checkpoints/demo-sr}
DATA_DIR=${DATA_DIR:-$ROOT/data}
NUM_IMAGES=${NUM_IMAGES:-4}
OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/super_resolution}
BATCH_SIZE=${BATCH_SIZE:-1}
TEMPERATURE=${TEMPERATURE:-1.02}
INPUT_SOURCE=${INPUT_SOURCE:-}

mkdir -p "$OUTPUT_PATH"
if [[ -z "$INPUT_SOURCE" ]]; then
  INPUT_SOURCE=$OUTPUT_PATH/inputs.tsv
  images_list=$(first_synthetic_images super_resolution.sh "$DATA_DIR/synthetic" "$NUM_IMAGES")
  while read -r image; do
    [[ -n "$image" ]] && printf '%s\t%s\n' "$(caption_of "$image")" "$image"
  done <<< "$images_list" > "$INPUT_SOURCE"
fi

args=(--task super-resolution --load "$LOAD" --input-source "$INPUT_SOURCE"
      --output-path "$OUTPUT_PATH" --batch-size "$BATCH_SIZE" --temperature "$TEMPERATURE")
# text2image.sh finds the checkpoint's tensor-parallel size and launches as many processes
exec "$ROOT/scripts/text2image.sh" "${args[@]}" "$@"
