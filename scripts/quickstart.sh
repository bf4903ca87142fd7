#!/usr/bin/env bash
# The whole pipeline on the embedded default, from a fresh clone, on a laptop CPU:
#   1. data       make the captioned images, train both tokenizers, write the LMDB (preprocess.sh)
#   2. pretrain   the demo model, text->image and its caption direction image->text together
#   3. evaluate   draw samples for held-out captions, rerank them by caption score, read every
#                 sample with the attribute reader -> report.md, report.json, grid.png
#   4. samples    text2image.sh for two new captions, best 2 of 8 by caption score
# METHOD=clip-gen: language-free instead (CLIP-GEN): a CLIP trained on the data, the LMDB with
# each picture's CLIP embedding, and a GPT trained on the pictures alone, prompted with the CLIP
# text embedding of the held-out captions and reranked by CLIP score.
# METHOD=lformer: the same data and training as caption, laid out in Lformer's L-shaped blocks
# (IMAGE_ORDER=lshape), so every image is drawn in grid-side steps instead of one per code.
# CVAE=D with it: Lformer's CVAE global latent of D dimensions, whose posterior reads each
# picture's CLIP embedding (so a CLIP is trained first, as for clip-gen).
# METHOD=diffusion: transformer latent diffusion (TLD) on the same trunk and data: a denoiser of
# the VQ-VAE's continuous latents (x0 prediction, EMA of the weights), its trunk started from a
# short autoregressive text->image run on the same data (--init-trunk: where a caption puts a
# shape is what a denoiser from scratch does not learn in this budget), sampled in 15
# DPM-Solver++ steps with guidance and reranked by the CLIP trained first, as for clip-gen.
# METHOD=fast-language-free: both savings together: a denoiser trained on the pictures alone,
# conditioned on their CLIP image embeddings (LAFITE's noise xi), with MaskDiT's masked patches
# (half of them hidden from the trunk, a one-layer mask decoder, the last 10 % unmasked), prompted
# with the CLIP text embedding of the held-out captions; its trunk and condition projector start
# from a short language-free autoregressive run (clip2image: pictures alone, too).
# It prints the figures and where everything is. A stage whose output exists is skipped, so an
# interrupted quickstart resumes where it stopped (training from its newest checkpoint).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  script_help 12
  cat <<'EOF'

Environment variables (defaults in brackets); the data and training defaults are those of
./scripts/preprocess.sh and ./scripts/pretrain_single_node.sh (see their --help):
  METHOD           caption (paired captions), clip-gen (language-free), lformer (L-shape
                   block-parallel decoding), diffusion (latent diffusion, TLD) or
                   fast-language-free (masked language-free diffusion, MaskDiT) [caption]
  DATA_DIR         data, tokenizers, LMDB [./data]
  SAVE             checkpoints and TensorBoard logs [./checkpoints/demo, ./checkpoints/clip-gen,
                   ./checkpoints/lformer, ./checkpoints/diffusion,
                   ./checkpoints/fast-language-free]
  OUTPUT_PATH      evaluation report and samples [./samples/quickstart, ./samples/clip-gen,
                   ./samples/lformer, ./samples/diffusion, ./samples/fast-language-free]
  NUM_PROMPTS      held-out captions evaluated [64]
  SAMPLES          samples per caption, RERANK_TOP of them kept by their score [16, 1]
  CFG_SCALE        classifier-free guidance of the samples (0: none) [0; lformer 1.5;
                   diffusion and fast-language-free 2, TLD's class_guidance 3]
  CLIP_NOISE       clip-gen, fast-language-free: LAFITE's noise xi on the CLIP image embedding
                   in training [0.2]
  MASK_RATIO       fast-language-free: the share of latent patches hidden from the trunk [0.5]
  TRUNK_ITERS      diffusion, fast-language-free: iterations of the autoregressive run
                   (text2image; clip2image for fast-language-free) the denoiser's trunk starts
                   from, 0 for none (a denoiser from scratch) [2000; its checkpoints: $SAVE-trunk]
  CVAE             lformer: the CVAE latent's dimension, 0 for none [0]; its checkpoints and
                   samples go to ./checkpoints/lformer-cvae and ./samples/lformer-cvae
EOF
  exit 0
fi
(( $# == 0 )) || { echo "quickstart.sh: takes no arguments (settings come from the environment;" \
                        "see --help)" >&2; exit 2; }

METHOD=${METHOD:-caption}
TRAIN_FLAGS=()  # extra pretrain.py flags of a method
CLIP=""         # the CLIP a method trains first
TRUNK_TASK=""   # the autoregressive run a denoiser's trunk starts from
export DATA_DIR=${DATA_DIR:-$ROOT/data}
# the quickstart samples with its own CFG_SCALE, so training need not choose one
export CHOOSE_GUIDANCE=${CHOOSE_GUIDANCE:-0}
case "$METHOD" in
  caption)
    export SAVE=${SAVE:-$ROOT/checkpoints/demo}
    OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/quickstart}
    LMDB=$DATA_DIR/tokens.lmdb
    STAGES=4 ;;
  clip-gen)
    export SAVE=${SAVE:-$ROOT/checkpoints/clip-gen}
    OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/clip-gen}
    LMDB=$DATA_DIR/tokens-clip.lmdb
    CLIP=$DATA_DIR/clip.pt
    STAGES=6 ;;
  lformer)
    CVAE=${CVAE:-0}
    if ((CVAE > 0)); then
      name=lformer-cvae LMDB=$DATA_DIR/tokens-lshape-clip.lmdb CLIP=$DATA_DIR/clip.pt STAGES=6
      TRAIN_FLAGS=(--cvae-latent-dim "$CVAE")
    else
      name=lformer LMDB=$DATA_DIR/tokens-lshape.lmdb STAGES=5
    fi
    export SAVE=${SAVE:-$ROOT/checkpoints/$name}
    OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/$name} ;;
  diffusion)
    export SAVE=${SAVE:-$ROOT/checkpoints/diffusion}
    OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/diffusion}
    LMDB=$DATA_DIR/tokens-clip.lmdb  # the CLIP beside the codes: stored with the checkpoint
    CLIP=$DATA_DIR/clip.pt
    export TASKS=diffusion:1 LR=${LR:-1e-3} TRAIN_ITERS=${TRAIN_ITERS:-1500}
    export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}
    TRAIN_FLAGS=(--ema-decay 0.999)
    TRUNK_TASK=text2image TRUNK_FLAGS=() TRUNK_WHAT="text->image" ;;
  fast-language-free)
    export SAVE=${SAVE:-$ROOT/checkpoints/fast-language-free}
    OUTPUT_PATH=${OUTPUT_PATH:-$ROOT/samples/fast-language-free}
    LMDB=$DATA_DIR/tokens-clip.lmdb
    CLIP=$DATA_DIR/clip.pt
    export TASKS=clip-diffusion:1 LR=${LR:-1e-3} TRAIN_ITERS=${TRAIN_ITERS:-2000}
    export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}
    TRAIN_FLAGS=(--ema-decay 0.999 --clip-noise "${CLIP_NOISE:-0.2}" --decoder-layers 1
                 --mask-ratio "${MASK_RATIO:-0.5}" --unmask-finetune-iters $((TRAIN_ITERS / 10)))
    TRUNK_TASK=clip2image TRUNK_FLAGS=(--clip-noise "${CLIP_NOISE:-0.2}")
    TRUNK_WHAT="CLIP embedding->image (the pictures alone)" ;;
  *) echo "quickstart.sh: METHOD must be caption, clip-gen, lformer, diffusion or" \
          "fast-language-free, got $METHOD" >&2
     exit 2 ;;
esac
if [[ -n "$TRUNK_TASK" ]]; then
  TRUNK_ITERS=${TRUNK_ITERS:-2000} TRUNK=$SAVE-trunk
  [[ "$TRUNK_ITERS" =~ ^[0-9]+$ ]] || { echo "quickstart.sh: TRUNK_ITERS must be a whole number" \
                                             "of iterations, got '$TRUNK_ITERS'" >&2; exit 2; }
  ((TRUNK_ITERS > 0)) && TRAIN_FLAGS+=(--init-trunk "$TRUNK")
  STAGES=$((TRUNK_ITERS > 0 ? 7 : 6))
fi
NUM_PROMPTS=${NUM_PROMPTS:-64}
SAMPLES=${SAMPLES:-16}
RERANK_TOP=${RERANK_TOP:-1}
# guidance: none for the raster models; 1.5 for L-shape, whose blocks are drawn in parallel (at
# the same checkpoint it lifts shape 0.68 -> 0.72, best 1 of 16)
case "$METHOD" in lformer) cfg=1.5 ;; diffusion | fast-language-free) cfg=2 ;; *) cfg=0 ;; esac
CFG_SCALE=${CFG_SCALE:-$cfg}
EVAL=$OUTPUT_PATH/eval

start=$(date +%s)
n=0
stage() { n=$((n + 1)); printf '\n==== quickstart %d/%d %s (%dm%02ds)\n' "$n" "$STAGES" "$1" \
            $(( ($(date +%s) - start) / 60 )) $(( ($(date +%s) - start) % 60 )); }

# data ---------------------------------------------------------------------------------------------
if [[ -f "$DATA_DIR/tokens.lmdb/layout.json" ]]; then
  stage "data: $DATA_DIR/tokens.lmdb exists, skipped"
else
  stage "data: embedded default -> tokenizers -> $DATA_DIR/tokens.lmdb"
  OUTPUT=$DATA_DIR/tokens.lmdb "$ROOT/scripts/preprocess.sh"
fi
if [[ -n "$CLIP" ]]; then  # clip-gen and the CVAE read a CLIP
  if [[ -f "$CLIP" && ! -f "$CLIP.state" ]]; then
    stage "CLIP: $CLIP exists, skipped"
  else
    stage "CLIP: trained on the embedded default's pictures and captions -> $CLIP"
    CLIP=$CLIP "$ROOT/scripts/train_clip.sh"
  fi
fi
if [[ "$METHOD" == clip-gen || "$METHOD" == diffusion || "$METHOD" == fast-language-free ]]; then
  if [[ -f "$LMDB/layout.json" ]]; then
    stage "data with CLIP embeddings: $LMDB exists, skipped"
  else
    stage "data with CLIP embeddings: each picture's CLIP embedding beside its codes -> $LMDB"
    OUTPUT=$LMDB CLIP=$CLIP "$ROOT/scripts/preprocess.sh"
  fi
fi

if [[ "$METHOD" == lformer ]]; then
  if [[ -f "$LMDB/layout.json" ]]; then
    stage "data in L-shape order: $LMDB exists, skipped"
  else
    stage "data in L-shape order: the same records, sequences in Lformer's blocks -> $LMDB"
    OUTPUT=$LMDB IMAGE_ORDER=lshape CLIP=${CLIP:-} "$ROOT/scripts/preprocess.sh"
  fi
fi

# pretrain -----------------------------------------------------------------------------------------
# trained DIR [ITERS]: the iteration of DIR's newest checkpoint when it reached ITERS (or the
# --train-iters of its run), else nothing.
trained() {
  "$PY" - "$1" "${2:-}" <<'EOF' 2>/dev/null || true
import sys
from megatron_t2i.training.convert import read_info
meta = read_info(sys.argv[1])[3]  # meta.json of the newest checkpoint
if meta["iteration"] >= int(sys.argv[2] or meta["train_iters"]):
    print(meta["iteration"])
EOF
}
train_s=""  # wall seconds of this run's training stages (empty when skipped)
if [[ -n "$TRUNK_TASK" ]] && ((TRUNK_ITERS > 0)); then
  if [[ -n "$(trained "$TRUNK" "$TRUNK_ITERS")" ]]; then
    stage "trunk: $TRUNK is trained, skipped"
  else
    stage "trunk: demo model, autoregressive $TRUNK_WHAT on the same data -> $TRUNK"
    t0=$(date +%s)
    DATA_PATH=$LMDB SAVE=$TRUNK TASKS=$TRUNK_TASK:1 TRAIN_ITERS=$TRUNK_ITERS MICRO_BATCH_SIZE=8 \
      LR=2e-3 "$ROOT/scripts/pretrain_single_node.sh" ${TRUNK_FLAGS[@]+"${TRUNK_FLAGS[@]}"}
    train_s=$(( $(date +%s) - t0 ))
  fi
fi
reached=$(trained "$SAVE" "${TRAIN_ITERS:-}")
if [[ -n "$reached" ]]; then
  stage "pretrain: $SAVE is trained (iteration $reached), skipped"
elif [[ "$METHOD" == clip-gen ]]; then
  stage "pretrain: demo model on the pictures alone, conditioned on their CLIP image embeddings -> $SAVE"
  t0=$(date +%s)
  DATA_PATH=$LMDB TASKS=clip2image:1 "$ROOT/scripts/pretrain_single_node.sh" \
    --clip-noise "${CLIP_NOISE:-0.2}"
  train_s=$(( ${train_s:-0} + $(date +%s) - t0 ))
elif [[ "$METHOD" == fast-language-free ]]; then
  stage "pretrain: demo-size denoiser on the pictures alone (CLIP image embeddings), half its patches masked -> $SAVE"
  t0=$(date +%s)
  DATA_PATH=$LMDB "$ROOT/scripts/pretrain_single_node.sh" "${TRAIN_FLAGS[@]}"
  train_s=$(( ${train_s:-0} + $(date +%s) - t0 ))
elif [[ "$METHOD" == diffusion ]]; then
  stage "pretrain: demo-size denoiser of the VQ-VAE latents, EMA of its weights -> $SAVE"
  t0=$(date +%s)
  DATA_PATH=$LMDB "$ROOT/scripts/pretrain_single_node.sh" "${TRAIN_FLAGS[@]}"
  train_s=$(( ${train_s:-0} + $(date +%s) - t0 ))
else
  stage "pretrain: demo model, text->image and image->text -> $SAVE (resumes from its newest checkpoint)"
  t0=$(date +%s)
  DATA_PATH=$LMDB "$ROOT/scripts/pretrain_single_node.sh" "${TRAIN_FLAGS[@]}"
  train_s=$(( ${train_s:-0} + $(date +%s) - t0 ))
fi

# evaluate -----------------------------------------------------------------------------------------
if [[ -f "$EVAL/report.json" && "$EVAL/report.json" -nt "$SAVE/latest" ]]; then
  stage "evaluate: $EVAL/report.json is newer than the checkpoint, skipped"
else
  stage "evaluate: $NUM_PROMPTS held-out captions x $SAMPLES samples, best $RERANK_TOP by their score"
  "$PY" evaluate.py --load "$SAVE" --data-path "$LMDB" --synthetic-dir "$DATA_DIR/synthetic" \
    --num-prompts "$NUM_PROMPTS" --samples-per-prompt "$SAMPLES" --rerank-top "$RERANK_TOP" \
    --cfg-scale "$CFG_SCALE" --output-path "$EVAL"
fi

# samples ------------------------------------------------------------------------------------------
SAMPLES_DIR=$OUTPUT_PATH/text2image
if [[ -d "$SAMPLES_DIR" && "$SAMPLES_DIR" -nt "$SAVE/latest" ]]; then
  stage "samples: $SAMPLES_DIR exists, skipped"
else
  stage "samples: two new captions -> $SAMPLES_DIR"
  rm -rf "$SAMPLES_DIR"
  mkdir -p "$OUTPUT_PATH"
  printf '%s\n' "a large red circle in the centre on a gray background" \
    "a small yellow star at the top left and a big blue square at the bottom right on a pink background" \
    > "$OUTPUT_PATH/captions.txt"
  "$ROOT/scripts/text2image.sh" --load "$SAVE" --input-source "$OUTPUT_PATH/captions.txt" \
    --batch-size 8 --rerank-top 2 --cfg-scale "$CFG_SCALE" --output-path "$SAMPLES_DIR"
fi

printf '\n==== quickstart done (%dm%02ds)\n' $(( ($(date +%s) - start) / 60 )) \
  $(( ($(date +%s) - start) % 60 ))
"$PY" - "$EVAL/report.json" "$train_s" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
a, best, tok = r["alignment"], r.get("alignment_reranked") or r["alignment"], r["tokenizer"]
by = (r["source"].get("reranked") or "by caption score").rsplit(" by ", 1)[-1]
def row(name, value, target, unit=""):
    mark = "ok" if value >= target else "below target"
    print(f"  {name:<44} {value:8.3f}{unit:<3} (target {target}{unit}: {mark})")
print(f"figures on {a['images']} samples of {r['source']['prompt_count']} held-out captions "
      f"({r['source'].get('reranked') or 'all samples'}):")
language_free = r["source"].get("condition", "").startswith("CLIP")
lshape = r["source"].get("decoding") == "lshape"
diffusion = r["source"].get("decoding") == "diffusion"
row(f"colour alignment, best by {by}", best["colour"], 0.75 if language_free and diffusion
    else 0.8 if language_free else 0.85 if lshape or diffusion else 0.9)
row(f"shape alignment, best by {by}", best["kind"], 0.6 if language_free and diffusion
    else 0.7 if language_free or lshape or diffusion else 0.8)
row("VQ-VAE PSNR on held-out images", tok["psnr"], 28, " dB")
print(f"  all samples: colour {a['colour']:.3f}, shape {a['kind']:.3f}, position {a['position']:.3f}, "
      f"exact {a['exact']:.3f}; chance (other captions): colour "
      f"{(r.get('alignment_other_captions') or {}).get('colour', float('nan')):.3f}")
speed = r.get("speed")
if speed:
    trained = f"; training took {int(sys.argv[2]) // 60} min {int(sys.argv[2]) % 60:02d} s" \
        if sys.argv[2] else ""
    print(f"  sampling: {speed['images_per_s']:.1f} images/s drawn, "
          f"{speed['images_per_s_with_reranking']:.1f} with reranking ({speed['device']}){trained}")
clip = (r.get("clip") or {}).get("clip_heldout")
if clip:
    row("CLIP text->image R@1 among 100 (held-out)", clip.get("text_to_image_r1_among_100")
        or clip["text_to_image_r1_all"], 0.6)
swap = ((r.get("binding") or {}).get("colour") or {}).get("text->image") or {}
share = {o: f"{v:.2f}" if isinstance(v, float) and v == v else "n/a" for o, v in swap.items()}
if any(v != "n/a" for v in share.values()):  # held-out two-shape pictures of unlike colours
    print(f"  colour binding (swap test, report section Binding; chance 0.5): "
          f"{share['named in reading order']} when the caption names the shapes in reading "
          f"order, {share['named in reverse']} in reverse")
EOF
cat <<EOF

  grid of samples  : $EVAL/grid.png   (one row per held-out caption: truth | samples, best first)
  report           : $EVAL/report.md  (and report.json)
  new samples      : $SAMPLES_DIR
  checkpoints      : $SAVE   (latest: $(cat "$SAVE/latest" 2>/dev/null || echo none))
  TensorBoard      : tensorboard --logdir $SAVE/tensorboard
  data, tokenizers : $DATA_DIR   (tokenizer training: tensorboard --logdir $DATA_DIR/runs)
next: ./scripts/text2image.sh --input-source interactive, ./scripts/image2text.sh,
      ./scripts/post_selection.sh (all on $SAVE by default)
EOF
