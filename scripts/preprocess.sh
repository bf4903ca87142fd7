#!/usr/bin/env bash
# Tokenize captioned images into an LMDB token data set.
#
# With no arguments: make the embedded default data set (procedural captioned images), train the
# text tokenizer (SentencePiece) and the image tokenizer (VQ-VAE) at demo size, and write the LMDB.
# Each stage is skipped when its output already exists, so a re-run resumes where it stopped.
#
# Your own images: INPUT=/path/to/folder_or.tsv_or.jsonl ./scripts/preprocess.sh, or webdataset /
# img2dataset shards: INPUT='shards/{00000..00099}.tar' (on many processes: see README).
# Every setting below can be overridden from the environment; extra flags go to the LMDB writer.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  script_help 10
  cat <<'EOF'

Environment variables (defaults in brackets):
  DATA_DIR          where everything is written [./data]
  INPUT             images with captions: folder (.txt beside each image), TSV, JSONL, or
                    webdataset shards (a .tar, 'dir/{00000..00099}.tar', a folder of .tar)
                    [empty: the embedded default, written to $DATA_DIR/synthetic]
  SYNTHETIC_COUNT   images in the embedded default [10000]
  CAPTION_ORDER     the embedded default names its shapes in reading order, or in any order
                    (harder for the demo model: see megatron_t2i/data/synthetic.py) [reading]
  IMAGE_SIZE        image side in pixels [36]
  VQVAE_DOWNSAMPLE  pixels per code along a side when training the VQ-VAE [4: 36 pixels -> 9x9
                    codes, 3x3 per cell of the shapes' grid]
  TEXT_TOKENIZER    SentencePiece model; trained from the captions if missing [$DATA_DIR/text.model]
  TEXT_VOCAB_SIZE   text vocabulary when training it [1000]
  IMAGE_TOKENIZER   VQ-VAE or VQGAN checkpoint; trained on the images if missing
                    [$DATA_DIR/vqvae.pt, or $DATA_DIR/vqgan.pt with IMAGE_TOKENIZER_KIND=vqgan]
  IMAGE_TOKENIZER_KIND  vqvae, or vqgan (adds a patch-GAN: sharper real photographs, see README)
                    when training it; when set, a given tokenizer of the other kind is refused
                    [empty: train a vqvae, accept either]
  VQVAE_STEPS       image tokenizer training steps [the tokenizer default]
  OUTPUT            the LMDB data set [$DATA_DIR/tokens.lmdb]
  CLIP              a CLIP (./scripts/train_clip.sh): each record also keeps the CLIP embedding
                    of its image, what language-free training reads [none]
  IMAGE_ORDER       the order models trained on the data generate an image in: raster, or lshape
                    (Lformer's L-shaped blocks, an h x h grid in h steps) [raster]
  WORKERS           parallel preprocessing workers [number of cores]
  SEED              random seed [1234]
EOF
  exit 0
fi

DATA_DIR=${DATA_DIR:-$ROOT/data}
INPUT=${INPUT:-}
SYNTHETIC_COUNT=${SYNTHETIC_COUNT:-10000}
CAPTION_ORDER=${CAPTION_ORDER:-reading}
IMAGE_SIZE=${IMAGE_SIZE:-36}
VQVAE_DOWNSAMPLE=${VQVAE_DOWNSAMPLE:-4}
TEXT_TOKENIZER=${TEXT_TOKENIZER:-$DATA_DIR/text.model}
TEXT_VOCAB_SIZE=${TEXT_VOCAB_SIZE:-1000}
IMAGE_TOKENIZER_KIND=${IMAGE_TOKENIZER_KIND:-}
IMAGE_TOKENIZER=${IMAGE_TOKENIZER:-$DATA_DIR/${IMAGE_TOKENIZER_KIND:-vqvae}.pt}
VQVAE_STEPS=${VQVAE_STEPS:-}
OUTPUT=${OUTPUT:-$DATA_DIR/tokens.lmdb}
CLIP=${CLIP:-}
IMAGE_ORDER=${IMAGE_ORDER:-raster}
WORKERS=${WORKERS:-$(nproc)}
SEED=${SEED:-1234}

mkdir -p "$DATA_DIR"
start=$(date +%s)
stage() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - start )); }

if [[ -z "$INPUT" ]]; then
  INPUT=$DATA_DIR/synthetic
  stage "embedded default data set: $SYNTHETIC_COUNT images -> $INPUT"
  "$PY" -m megatron_t2i.cli.synthetic --synthetic-dir "$INPUT" --synthetic-count "$SYNTHETIC_COUNT" \
    --image-size "$IMAGE_SIZE" --caption-order "$CAPTION_ORDER" --seed "$SEED"
fi
# (a brace pattern of shards names files, not itself: preprocessing checks each of them)
[[ -e "$INPUT" || "$INPUT" == *"{"* || "$INPUT" == *"::"* ]] \
  || { echo "preprocess.sh: INPUT $INPUT does not exist" >&2; exit 2; }

if [[ -f "$TEXT_TOKENIZER" ]]; then
  stage "text tokenizer: using $TEXT_TOKENIZER"
else
  stage "text tokenizer: training SentencePiece ($TEXT_VOCAB_SIZE ids) -> $TEXT_TOKENIZER"
  "$PY" -m megatron_t2i.cli.text_tokenizer --input "$INPUT" --text-tokenizer "$TEXT_TOKENIZER" \
    --text-vocab-size "$TEXT_VOCAB_SIZE"
fi

if [[ -f "$IMAGE_TOKENIZER" ]]; then
  stage "image tokenizer: using $IMAGE_TOKENIZER"
else
  stage "image tokenizer: training the ${IMAGE_TOKENIZER_KIND:-vqvae} -> $IMAGE_TOKENIZER"
  "$PY" -m megatron_t2i.cli.train_vqvae --input "$INPUT" --image-tokenizer "$IMAGE_TOKENIZER" \
    --image-size "$IMAGE_SIZE" --vqvae-downsample "$VQVAE_DOWNSAMPLE" --seed "$SEED" \
    --tensorboard-dir "$DATA_DIR/runs/vqvae" ${VQVAE_STEPS:+--vqvae-steps "$VQVAE_STEPS"} \
    ${IMAGE_TOKENIZER_KIND:+--image-tokenizer-kind "$IMAGE_TOKENIZER_KIND"}
fi

stage "tokenizing into LMDB -> $OUTPUT"
"$PY" -m megatron_t2i.cli.preprocess --input "$INPUT" --output "$OUTPUT" \
  --text-tokenizer "$TEXT_TOKENIZER" --image-tokenizer "$IMAGE_TOKENIZER" \
  --image-size "$IMAGE_SIZE" --workers "$WORKERS" --image-order "$IMAGE_ORDER" \
  ${CLIP:+--clip "$CLIP"} ${IMAGE_TOKENIZER_KIND:+--image-tokenizer-kind "$IMAGE_TOKENIZER_KIND"} "$@"

stage "done"
cat <<EOF
  images and captions : $INPUT
  text tokenizer      : $TEXT_TOKENIZER
  image tokenizer     : $IMAGE_TOKENIZER   (TensorBoard: $DATA_DIR/runs/vqvae)
  token data set      : $OUTPUT   (layout: $OUTPUT/layout.json)
EOF
