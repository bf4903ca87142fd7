"""Sample from a trained model: one entry point for every generation task.

    python generate_samples.py --load checkpoints/demo                      # interactive prompt
    python generate_samples.py --load DIR --input-source queries.txt --batch-size 8 --cfg-scale 2
    torchrun --nproc_per_node 2 generate_samples.py --load DIR_TP2 ...      # tensor parallel

Tasks (--task) are the generators of the task registry (megatron_t2i/tasks.py): text2image
(default), completion, image2text, post-selection, super-resolution, each a function of
megatron_t2i/generation/tasks/

    main_<task>(ctx, config) -> None

with `ctx` a GenerationContext (megatron_t2i/generation/loading.py): ctx.model (GPT in eval mode,
this rank's tensor-parallel shard), ctx.config (ModelConfig), ctx.layout (TokenLayout),
ctx.text_tokenizer, ctx.image_tokenizer (on the writer only, else None), ctx.device,
ctx.is_writer (global rank 0); and `config` the GenerationConfig these flags make
(megatron_t2i/generation/config.py). Every rank calls it; all ranks run the model together, only
the writer reads input (megatron_t2i.generation.io.queries broadcasts each query) and writes
files. A task raises ValueError/OSError with a one-line message for bad input.

Under torchrun the world is one tensor-parallel group: N processes load the N shards of a
checkpoint saved at TP=N (tools/convert_checkpoint.py reshards). Tokenizers default to the ones
stored with the checkpoint ({save}/tokenizers/).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i import tasks as registry
from megatron_t2i.arguments import generation_config, load_config, parse_args

PROG = "generate_samples.py"
def task_function(task: str):
    """The task's generator (megatron_t2i/tasks.py), imported lazily: a task's module may be
    absent from an installation."""
    module_name, _, function = registry.get(task).generator.partition(":")
    if importlib.util.find_spec(module_name) is None:
        raise ValueError(f"--task {task}: {module_name.replace('.', '/')}.py is not part of this "
                         f"installation")
    fn = getattr(importlib.import_module(module_name), function, None)
    if fn is None:
        raise ValueError(f"--task {task}: {module_name} has no {function}")
    return fn


def init_parallel(args) -> None:
    """Under a launcher (WORLD_SIZE > 1): join the process group, one TP group of all ranks."""
    from megatron_t2i.generation.io import INTERACTIVE
    from megatron_t2i.device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tensor_model_parallel_size not in (1, world):
        raise ValueError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: "
                         f"generation runs one process per tensor-parallel rank; launch "
                         f"{args.tensor_model_parallel_size} processes (torchrun --nproc_per_node)")
    if world == 1:
        return
    device = resolve_device(args.device)  # before NCCL starts: each rank on its own GPU
    backend = args.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    # interactive: the other ranks wait in a broadcast while a person types
    timeout = timedelta(days=1) if args.input_source == INTERACTIVE else timedelta(minutes=30)
    dist.init_process_group(backend, timeout=timeout)
    mpu.initialize_model_parallel(world, 1)


def parse(argv=None):
    return parse_args(argv, groups=("training", "tokenizers", "distributed", "generation"),
                      description=__doc__.split("\n")[0], prog=PROG)


def main(argv=None) -> int:
    args = parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        run = task_function(args.task)
        init_parallel(args)
        config = generation_config(args)
        from megatron_t2i.generation.guidance import resolve_guidance
        from megatron_t2i.generation.loading import build_context
        with torch.no_grad():
            ctx = build_context(load_config(args))
            config = resolve_guidance(ctx, config)
            if ctx.config.latent_channels and registry.get(args.task).name not in (
                    "text2image", "interpolation", "completion"):
                raise ValueError(f"--task {args.task} needs an autoregressive model; this "
                                 f"checkpoint is a denoiser (--tasks diffusion), which draws "
                                 f"images from captions: --task text2image, interpolation or "
                                 f"completion")
            run(ctx, config)
    except (ValueError, OSError) as e:
        where = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{PROG}: error: {where}{e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
