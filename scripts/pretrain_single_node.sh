#!/usr/bin/env bash
# Pretrain on one machine, on every local device: each GPU, or on a CPU-only machine one process
# per 1-2 cores (gloo). With no arguments: the demo model on the embedded default data set
# (./scripts/preprocess.sh runs first when the LMDB is missing).
#
# Extra arguments go to pretrain.py and win over the defaults below, e.g.
#   ./scripts/pretrain_single_node.sh --train-iters 200 --bf16
#   MP_SIZE=2 NUM_GPUS_PER_WORKER=4 ./scripts/pretrain_single_node.sh --model-size cogview-tutorial
# Re-running the same command resumes from the newest checkpoint in $SAVE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "$0")/lib/common.sh"

usage() {
  script_help 10
  cat <<'EOF'

Environment variables (defaults in brackets):
  NUM_GPUS_PER_WORKER  processes on this machine [all GPUs; on CPUs: cores/2, at least 1]
  MP_SIZE              tensor-parallel size [1]
  PP_SIZE              pipeline-parallel size [1]
  MODEL_SIZE           named model size: tiny, demo, cogview-tutorial, cogview-4b [demo]
  DATA_PATH            token data set(s) [$DATA_DIR/tokens.lmdb, made by preprocess.sh if missing]
  DATA_DIR             where preprocess.sh writes [./data]
  SAVE                 checkpoint folder; TensorBoard logs go to $SAVE/tensorboard [./checkpoints/demo]
  DS_CONFIG            DeepSpeed JSON [scripts/ds_config.json]
  TASKS                training tasks and weights: text->image and the caption direction
                       image->text in one model [text2image:3,image2text:1]
  TRAIN_ITERS          optimiser steps [4500: about 20 minutes on 2 CPU cores]
  MICRO_BATCH_SIZE     sequences per process per micro-batch [8]
  LR                   peak learning rate [2e-3]
  DROPOUT              hidden and attention dropout [by the data set's size: 0 from 5000 records
                       (the demo is far from overfitting), else 0.1]
  TEXT_DROPOUT         share of text->image samples without their caption, which classifier-free
                       guidance (--cfg-scale) needs [0.1]
  CHOOSE_GUIDANCE      after training, choose the guidance scale generation uses by default on
                       8 held-out captions (megatron_t2i.cli.choose_guidance) [1]
  MASTER_PORT          rendezvous port [29500]
  LAUNCHER             torchrun or deepspeed [torchrun]
EOF
}
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }

DATA_DIR=${DATA_DIR:-$ROOT/data}
DATA_PATH=${DATA_PATH:-$DATA_DIR/tokens.lmdb}
SAVE=${SAVE:-$ROOT/checkpoints/demo}
MODEL_SIZE=${MODEL_SIZE:-demo}
MP_SIZE=${MP_SIZE:-1}
PP_SIZE=${PP_SIZE:-1}
DS_CONFIG=${DS_CONFIG:-$ROOT/scripts/ds_config.json}
TASKS=${TASKS:-text2image:3,image2text:1}
TRAIN_ITERS=${TRAIN_ITERS:-4500}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
LR=${LR:-2e-3}
TEXT_DROPOUT=${TEXT_DROPOUT:-0.1}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-torchrun}
CHOOSE_GUIDANCE=${CHOOSE_GUIDANCE:-1}

gpus=$(gpu_count)
if [[ -z "${NUM_GPUS_PER_WORKER:-}" ]]; then
  if (( gpus > 0 )); then NUM_GPUS_PER_WORKER=$gpus
  else NUM_GPUS_PER_WORKER=$(( $(nproc) / 2 )); (( NUM_GPUS_PER_WORKER >= 1 )) || NUM_GPUS_PER_WORKER=1
  fi
fi
if (( NUM_GPUS_PER_WORKER % (MP_SIZE * PP_SIZE) )); then
  echo "pretrain_single_node.sh: NUM_GPUS_PER_WORKER=$NUM_GPUS_PER_WORKER is not a multiple of" \
       "MP_SIZE x PP_SIZE = $((MP_SIZE * PP_SIZE))" >&2
  exit 2
fi
if (( gpus == 0 )); then
  backend=gloo
  share_cpu_cores "$NUM_GPUS_PER_WORKER"
else
  backend=nccl
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi

if [[ ! -d "$DATA_PATH" && "$DATA_PATH" == "$DATA_DIR/tokens.lmdb" ]]; then
  echo "== no token data set at $DATA_PATH: running ./scripts/preprocess.sh first"
  DATA_DIR=$DATA_DIR OUTPUT=$DATA_PATH "$ROOT/scripts/preprocess.sh"
fi

if [[ -z "${DROPOUT:-}" ]]; then
  # shellcheck disable=SC2086  # DATA_PATH may name several data sets
  records=$("$PY" -c 'import sys; from megatron_t2i.data.loader import open_dataset
print(len(open_dataset(sys.argv[1:])[0]))' $DATA_PATH 2>/dev/null || echo 0)
  if (( records >= 5000 )); then DROPOUT=0; else DROPOUT=0.1; fi
  echo "== DROPOUT $DROPOUT (the data set holds $records records; set DROPOUT to choose)"
fi

args=(--model-size "$MODEL_SIZE" --data-path "$DATA_PATH" --save "$SAVE"
      --tensor-model-parallel-size "$MP_SIZE" --pipeline-model-parallel-size "$PP_SIZE"
      --deepspeed_config "$DS_CONFIG" --distributed-backend "$backend"
      --tasks "$TASKS" --train-iters "$TRAIN_ITERS" --micro-batch-size "$MICRO_BATCH_SIZE" --lr "$LR"
      --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT" --text-dropout "$TEXT_DROPOUT"
      --save-interval 250 --eval-interval 250 --log-interval 25)

echo "== training $MODEL_SIZE on $NUM_GPUS_PER_WORKER $( ((gpus > 0)) && echo GPU || echo CPU) process(es)" \
     "(TP $MP_SIZE x PP $PP_SIZE, $backend)"
case "$LAUNCHER" in
  torchrun)
    "$PY" -m megatron_t2i.cli.launch --standalone --nproc_per_node "$NUM_GPUS_PER_WORKER" \
      pretrain.py "${args[@]}" "$@" ;;
  deepspeed)
    deepspeed --num_nodes 1 --num_gpus "$NUM_GPUS_PER_WORKER" --master_port "$MASTER_PORT" \
      pretrain.py "${args[@]}" "$@" ;;
  *) echo "pretrain_single_node.sh: LAUNCHER must be torchrun or deepspeed, got $LAUNCHER" >&2; exit 2 ;;
esac

if (( CHOOSE_GUIDANCE )) && (( MP_SIZE * PP_SIZE == 1 )); then
  echo "== choosing the default guidance scale on held-out captions"
  # shellcheck disable=SC2086  # DATA_PATH may name several data sets
  "$PY" -m megatron_t2i.cli.choose_guidance --load "$SAVE" --data-path $DATA_PATH \
    --num-prompts 8 --samples-per-prompt 4 \
    || echo "note: no guidance scale chosen (see above); generation defaults to --cfg-scale 0"
fi

cat <<EOF

== done
  checkpoints : $SAVE   (latest: $(cat "$SAVE/latest" 2>/dev/null || echo none))
  TensorBoard : tensorboard --logdir $SAVE/tensorboard
  generate    : ./scripts/text2image.sh --load $SAVE
EOF
