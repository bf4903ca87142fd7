"""Pretrain (or fine-tune) a GPT over [text | image] tokens under DeepSpeed.

    deepspeed --num_gpus 8 pretrain.py --model-size cogview-tutorial --data-path data/tokens.lmdb \
        --save checkpoints/run1 --train-iters 100000 --bf16
    torchrun --nproc_per_node 2 pretrain.py --model-size demo --data-path ... (CPU: gloo)

Re-running the same command resumes from the newest complete checkpoint in --save (or --load).
SIGTERM/SIGINT save a checkpoint and exit cleanly. See ./scripts/pretrain_single_node.sh.
"""
from __future__ import annotations

import logging
import sys

import torch.distributed as dist

from megatron_t2i.arguments import parse_args, train_config
from megatron_t2i.training.loop import NonFiniteLoss
from megatron_t2i.training.setup import prepare

logger = logging.getLogger("megatron_t2i.train")


def main(argv=None) -> int:
    args = parse_args(argv, groups=("model", "data", "tokenizers", "training", "distributed"),
                      description=__doc__.split("\n")[0], prog="pretrain.py")
    if not args.data_path:
        print("pretrain.py: error: --data-path is required (make one with ./scripts/preprocess.sh)",
              file=sys.stderr)
        return 2
    try:
        trainer = prepare(train_config(args))
        outcome = trainer.run()
    except (ValueError, FileNotFoundError) as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the trainer's own signal handler is in place
        print("pretrain.py: interrupted while starting up; nothing new was trained (the same "
              "command starts again, or resumes from --save's newest checkpoint)",
              file=sys.stderr)
        return 130
    finally:
        if "trainer" in locals() and trainer.writer:
            trainer.writer.close()
    logger.info("%s at iteration %d", "stopped by signal, checkpoint saved"
                if outcome == "stopped" else "training finished", trainer.iteration)
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
