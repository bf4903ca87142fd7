#!/usr/bin/env bash
# Rank candidate images by how well they explain a text: the caption model's log-likelihood of
# the text given each image (optionally also an open_clip model's similarity, local weights only).
# With no arguments: queries made from the embedded default data set, each the caption of one
# image and 4 candidate images among which it is; ranked by ./checkpoints/demo. Scores go to
# $OUTPUT_PATH/post_selection.tsv, the best $TOP images of each query to $OUTPUT_PATH/{text}/.
#
# Your own queries: INPUT_SOURCE=queries.tsv ./scripts/post_selection.sh  (text<TAB>img1<TAB>img2...)
# Extra arguments go to generate_samples.py, e.g. --clip-model ViT-B-32 --clip-checkpoint FILE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

usage() {
  script_help 9
  cat <<'HELP'

Environment variables (defaults in brackets):
  LOAD           caption model checkpoint (trained with --tasks image2text) [./checkpoints/demo]
  INPUT_SOURCE   file of text<TAB>image... lines [made from $DATA_DIR/synthetic]
  NUM_QUERIES    queries made from the embedded default [4]
  DATA_DIR       where preprocess.sh wrote the embedded default [./data]
  OUTPUT_PATH    output folder [./samples/post_selection]
  TOP            images copied per query [1]
Launching (MP_SIZE, NUM_GPUS, MASTER_PORT): see ./scripts/text2image.sh --help
HELP
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }

source "$ROOT/scripts/lib/synthetic.sh"
LOAD=${LOAD:-$ROOT/checkpoints/demo}
DATA_DIR=${DATA_DIR:-$ROOT/data}
NUM_QUERIES=${NUM_QUERIES:-4}
OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/post_selection}
TOP=${TOP:-1}
INPUT_SOURCE=${INPUT_SOURCE:-}

mkdir -p "$OUTPUT_PATH"
if [[ -z "$INPUT_SOURCE" ]]; then
  INPUT_SOURCE=$OUTPUT_PATH/queries.tsv
  images_list=$(first_synthetic_images post_selection.sh "$DATA_DIR/synthetic" $((4 * NUM_QUERIES)))
  images=()
  [[ -z "$images_list" ]] || mapfile -t images <<< "$images_list"
  : > "$INPUT_SOURCE"
  for ((q = 0; 4 * q < ${#images[@]} && q < NUM_QUERIES; q++)); do
    candidates=("${images[@]:$((4 * q)):4}")
    truth=${candidates[$((q % ${#candidates[@]}))]}   # the captioned image, at a varying place
    printf '%s\t%s\n' "$(caption_of "$truth")" \
      "$(IFS=$'\t'; echo "${candidates[*]}")" >> "$INPUT_SOURCE"
  done
fi

args=(--task post-selection --load "$LOAD" --input-source "$INPUT_SOURCE"
      --output-path "$OUTPUT_PATH" --top "$TOP")
# text2image.sh finds the checkpoint's tensor-parallel size and launches as many processes
exec "$ROOT/scripts/text2image.sh" "${args[@]}" "$@"
