"""The DeepSpeed engine from a TrainConfig: process groups, the model, optimiser and schedule.

Everything DeepSpeed-specific at start-up lives here, so the loop only sees `engine`:
  * torch.distributed through DeepSpeed (env:// from any launcher, or MPI discovery), NCCL on GPUs
    and gloo on CPUs, with a bounded timeout so a dead rank never leaves the others waiting forever;
  * our mpu groups, handed to DeepSpeed so gradients are averaged over data-parallel ranks only and
    gradient clipping counts a tensor-parallel parameter's shards once each and replicated
    parameters once in all;
  * AdamW without weight decay on biases and LayerNorms, and the warm-up + decay schedule;
  * fp16 (dynamic loss scale: an overflowing step is skipped on every rank, the decision all-reduced
    by DeepSpeed) or bf16; ZeRO 0/1/2 (at most 1 with pipeline parallelism).
"""
from __future__ import annotations

import json
import logging
import os
from datetime import timedelta

import torch

from megatron_t2i import mpu
from megatron_t2i.io_utils import read_json
from megatron_t2i.training.lr import build_scheduler

logger = logging.getLogger(__name__)

# what a run without --deepspeed_config uses (scripts/ds_config.json is the same, to edit)
DEFAULT_DS_CONFIG = {
    "zero_optimization": {"stage": 0},
    "fp16": {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": False},
}


def init_distributed(backend: str | None = None, timeout_minutes: float | None = None) -> None:
    """Join the process group the launcher describes (RANK/WORLD_SIZE/MASTER_* or MPI)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    minutes = timeout_minutes or float(os.environ.get("MEGATRON_T2I_DIST_TIMEOUT_MINUTES", "10"))
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=minutes),
                               auto_mpi_discovery="RANK" not in os.environ,
                               distributed_port=int(os.environ.get("MASTER_PORT", "29500")))


class DeepSpeedMPU:
    """Our process groups under the names DeepSpeed's `mpu` argument expects."""

    get_model_parallel_rank = staticmethod(mpu.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(mpu.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(mpu.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(mpu.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(mpu.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(mpu.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(mpu.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(mpu.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(mpu.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(mpu.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(mpu.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(mpu.get_pipeline_model_parallel_group)


def load_ds_config(cfg) -> dict:
    """The DeepSpeed JSON (cfg.deepspeed_config, else DEFAULT_DS_CONFIG) with the TrainConfig
    winning for batch sizes, clipping, precision and ZeRO stage."""
    path = cfg.deepspeed_config
    ds = read_json(path, f"--deepspeed_config {path}", expect=dict) if path \
        else json.loads(json.dumps(DEFAULT_DS_CONFIG))
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"--deepspeed_config {path}: remove the '{key}' section; the optimiser "
                             f"and schedule come from --lr, --weight-decay, --warmup, "
                             f"--lr-decay-style (AdamW, warm-up then decay)")
    if ds.get("checkpoint", {}).get("load_universal"):
        raise ValueError(f"--deepspeed_config {path}: remove checkpoint.load_universal; universal "
                         f"checkpoints are not read here (convert with tools/convert_checkpoint.py)")
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and DP size
    ds["gradient_clipping"] = cfg.clip_grad
    if cfg.fp16 or cfg.bf16:
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": bool(cfg.fp16)}
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(cfg.bf16)}
    if cfg.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if cfg.pipeline_model_parallel_size > 1 and stage > 1:
        raise ValueError(f"ZeRO stage {stage} does not work with pipeline parallelism "
                         f"(--pipeline-model-parallel-size {cfg.pipeline_model_parallel_size}); "
                         f"use --zero-stage 0 or 1")
    if stage > 2:
        raise ValueError(f"ZeRO stage {stage} is not supported here; use 0, 1 or 2")
    ds.setdefault("steps_per_print", 10 ** 9)  # our loop logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision(ds_config: dict) -> torch.dtype:
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32


def allow_fp16_on_cpu() -> None:
    """DeepSpeed refuses fp16 on CPUs without AVX512-FP16, though torch computes it correctly
    (slowly). Allow it, so CPU runs exercise the same fp16 loss-scaling path as GPUs."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        logger.warning("fp16 on this CPU is emulated and slow; prefer --bf16 on CPUs")
        acc.is_fp16_supported = lambda: True


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, biases and LayerNorm weights (1-D) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg, model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize with our optimiser, schedule and process groups -> engine.
    cfg: TrainConfig."""
    import deepspeed

    if precision(ds_config) == torch.float16:
        allow_fp16_on_cpu()
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    scheduler = build_scheduler(optimizer, cfg.train_iters, cfg.warmup, cfg.lr_decay_style,
                                cfg.min_lr_ratio)
    is_pipeline = cfg.pipeline_model_parallel_size > 1
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=None if is_pipeline else DeepSpeedMPU(), dist_init_required=False)
    _record_fp32_grad_norm(engine)
    return engine


def _record_fp32_grad_norm(engine) -> None:
    """In fp32 without ZeRO, DeepSpeed clips but forgets the norm; keep it for logging (the same
    model-parallel-aware norm, computed once)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip():
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(),
                                                   engine.gradient_clipping(), mpu=engine.mpu)
    engine.clip_fp32_gradients = clip


def loss_scale(engine) -> float:
    """Current dynamic loss scale (1.0 when not training in fp16)."""
    opt = engine.optimizer  # where the scale lives differs between DeepSpeed's fp16 optimisers
    for holder in (opt, getattr(opt, "loss_scale_config", None), getattr(opt, "loss_scaler", None)):
        scale = getattr(holder, "cur_scale", None)
        if scale is not None:
            return float(scale)
    return 1.0
