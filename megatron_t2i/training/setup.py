"""From parsed arguments to a ready Trainer: process groups, data, model, engine, resume.

Used by pretrain.py and by bench/train_throughput.py, so both run exactly the same set-up.
"""
from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i.config import model_config
from megatron_t2i.data.loader import open_dataset, split_indices
from megatron_t2i.training import checkpoint as ckpt
from megatron_t2i.training.engine import (build_engine, device_for_local_rank, init_distributed,
                                          load_ds_config, precision)
from megatron_t2i.training.flops import matmul_flops
from megatron_t2i.training.loop import METRICS_FILE, PipelineLoss, Trainer, drop_replayed_metrics

logger = logging.getLogger("megatron_t2i.train")


def build_config(args, layout):
    overrides = {k: v for k, v in {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads}.items() if v}
    overrides.update({k: v for k, v in {"sandwich_ln": args.sandwich_ln,
                                        "pb_relax": args.pb_relax}.items() if v is not None})
    overrides.update(hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
                     checkpoint_activations=args.checkpoint_activations)
    return model_config(args.model_size, layout, args.tensor_model_parallel_size, list(args.tasks),
                        **overrides)


def build_model(args, config, layout, ds_config):
    """GPT, or with --pipeline-model-parallel-size > 1 this rank's pipeline stage of it."""
    if args.pipeline_model_parallel_size > 1:
        from megatron_t2i.model.pipeline import build_pipeline_model, check_ds_config
        check_ds_config(ds_config, args.pipeline_model_parallel_size)
        return build_pipeline_model(
            config, tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            loss_fn=PipelineLoss(layout.num_image_codes), base_seed=args.seed)
    from megatron_t2i.model.gpt import GPT
    return GPT(config, seed=args.seed)  # the pipeline's per-layer seeds: PP sizes start equal


def resume_dir(args) -> str | None:
    """--load, else --save when it already holds a checkpoint (re-running resumes)."""
    if args.load:
        return args.load
    if args.save and os.path.isfile(os.path.join(args.save, ckpt.LATEST)):
        return args.save
    return None


def prepare(args) -> Trainer:
    """Everything before the first step; collective (call on every rank)."""
    init_distributed(args.distributed_backend)
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    mpu.initialize_model_parallel(args.tensor_model_parallel_size,
                                  args.pipeline_model_parallel_size)
    device = device_for_local_rank()
    dataset, layout = open_dataset(args.data_path)
    config = build_config(args, layout)
    config.check_tensor_parallel(args.tensor_model_parallel_size)
    load_dir = resume_dir(args)
    tag = ckpt.choose_checkpoint(load_dir, args.resume_fallback) if load_dir else None
    if load_dir:
        ckpt.check_compatible(load_dir, config, layout, tag)
    mpu.model_parallel_seed(args.seed)
    ds_config = load_ds_config(args)
    model = build_model(args, config, layout, ds_config)
    engine = build_engine(args, model, ds_config)
    iteration, consumed = 0, 0
    if load_dir:
        state = ckpt.load_checkpoint(engine, load_dir, config, layout, finetune=args.finetune,
                                     tag=tag, trust=args.trust_checkpoint)
        iteration, consumed = state.get("iteration", 0), state.get("data", {}).get("consumed", 0)
        logger.info("%s from %s at iteration %d", "fine-tuning" if args.finetune else "resuming",
                    os.path.join(load_dir, tag), iteration)
    if rank == 0 and args.save and hasattr(dataset, "meta"):
        ckpt.store_tokenizers(args.save, dataset.meta)
    train_idx, eval_idx = split_indices(len(dataset), args.holdout_fraction, args.seed)
    writer = None
    tb_dir = args.tensorboard_dir or (os.path.join(args.save, "tensorboard") if args.save else None)
    if rank == 0 and tb_dir:
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run replays the iterations after its checkpoint: drop what was logged of them
        writer = SummaryWriter(tb_dir, purge_step=iteration + 1 if iteration else None)
        drop_replayed_metrics(os.path.join(tb_dir, METRICS_FILE), iteration)
    rate = matmul_flops(precision(ds_config), device)
    if rank == 0:
        logger.info("model %s: %.1f M parameters | layout %s | %d train / %d held-out records "
                    "| world %d = TP %d x PP %d x DP %d | %s | matmul %.1f GFLOP/s",
                    args.model_size, config.num_parameters() / 1e6, layout.name, len(train_idx),
                    len(eval_idx), dist.get_world_size(), args.tensor_model_parallel_size,
                    args.pipeline_model_parallel_size, mpu.get_data_parallel_world_size(),
                    precision(ds_config), rate / 1e9)
        if args.save:
            logger.info("checkpoints: %s | TensorBoard: %s", args.save, tb_dir)
    return Trainer(args, engine, config, layout, dataset, train_idx, eval_idx, writer, rate,
                   iteration, consumed)
