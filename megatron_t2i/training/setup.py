"""From a TrainConfig to a ready Trainer: process groups, data, model, engine, resume.

Used by pretrain.py and by bench/train_throughput.py, so both run exactly the same set-up.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i import tasks as registry
from megatron_t2i.config import model_config
from megatron_t2i.data.latents import codebook, image_tokenizer_of, latent_scale
from megatron_t2i.data.latents import latent_table as table_of
from megatron_t2i.data.loader import open_dataset, split_indices
from megatron_t2i.device import resolve_device
from megatron_t2i.training import checkpoint as ckpt
from megatron_t2i.training.config import TrainConfig
from megatron_t2i.training.ema import EMA, EMA_KEY
from megatron_t2i.training.engine import build_engine, init_distributed, load_ds_config, precision
from megatron_t2i.training.flops import MatmulReference
from megatron_t2i.training.loop import (BEST_EVAL_KEY, METRICS_FILE, PROGRESS_KEY, PipelineLoss,
                                        Trainer, drop_replayed_metrics)
from megatron_t2i.training.objectives import build_objective

logger = logging.getLogger("megatron_t2i.train")
EPOCHS_WARNING = 5  # passes over the training records past which overfitting is to be expected


def build_model(cfg: TrainConfig, config, objective, ds_config):
    """GPT, or with pipeline parallelism this rank's stage of it."""
    if cfg.pipeline_model_parallel_size > 1:
        from megatron_t2i.model.pipeline import build_pipeline_model, check_ds_config
        check_ds_config(ds_config, cfg.pipeline_model_parallel_size)
        return build_pipeline_model(
            config, tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            loss_fn=PipelineLoss(objective), base_seed=cfg.seed)
    from megatron_t2i.model.gpt import GPT
    return GPT(config, seed=cfg.seed)  # the pipeline's per-layer seeds: PP sizes start equal


def condition_fields(cfg: TrainConfig, dataset, layout) -> dict:
    """The ModelConfig fields of a conditioned task (clip2image): the dimension of its record
    array, the slots, the placeholder id; {} when no task of the run is conditioned."""
    arrays = {registry.get(n).condition for n in cfg.tasks} - {None}
    if not arrays:
        return {}
    if len(arrays) > 1:
        raise ValueError(f"--tasks read different condition arrays {sorted(arrays)}; one per run")
    name = arrays.pop()
    first = dataset[0].arrays or {} if len(dataset) else {}
    if name not in first:
        raise ValueError(f"--data-path: the records hold no {name!r} array, which --tasks "
                         f"{', '.join(cfg.tasks)} needs; preprocess with --clip FILE")
    return {"condition_dim": int(first[name].size), "condition_slots": cfg.condition_slots,
            "slot_token": layout["[MASK]"]}


def latent_fields(cfg: TrainConfig, dataset, layout) -> dict:
    """The ModelConfig fields of a CVAE latent (--cvae-latent-dim); {} without one."""
    if not cfg.cvae_latent_dim:
        return {}
    if cfg.cvae_latent_dim < 0:
        raise ValueError(f"--cvae-latent-dim {cfg.cvae_latent_dim}: must be >= 0")
    if cfg.pipeline_model_parallel_size > 1:
        raise ValueError("--cvae-latent-dim: the CVAE latent trains without pipeline parallelism "
                         "(its KL is computed on the first stage); use "
                         "--pipeline-model-parallel-size 1 with TP or DP")
    if "text2image" not in cfg.tasks:
        raise ValueError("--cvae-latent-dim: the latent is text->image's; add text2image to "
                         "--tasks")
    first = dataset[0].arrays or {} if len(dataset) else {}
    if "clip_image" not in first:
        raise ValueError("--cvae-latent-dim: the CVAE's posterior reads each record's CLIP image "
                         "embedding; --data-path has none: preprocess with --clip FILE")
    return {"latent_dim": cfg.cvae_latent_dim, "latent_source_dim": int(first["clip_image"].size),
            "text_token_start": layout.text_offset, "text_token_end": layout.special_offset,
            "context_token": layout["[BOI1]"]}


def denoiser_fields(cfg: TrainConfig, dataset, layout, train_idx) -> tuple[dict, object]:
    """The ModelConfig fields of a denoising task (diffusion), with the latents' scale measured
    on the training records (data/latents.py), and the image tokenizer whose codebook vectors are
    its latents; ({}, None) when no task of the run denoises."""
    if not any(registry.get(n).latents for n in cfg.tasks):
        if cfg.inpaint_masks:
            raise ValueError("--inpaint-masks: in/outpainting is a denoiser's (--tasks diffusion "
                             "or clip-diffusion)")
        return {}, None
    if layout.image_order != "raster":
        raise ValueError(f"--tasks diffusion: the data set's codes are laid out in "
                         f"{layout.image_order} order; a denoiser reads raster data (preprocess "
                         f"with --image-order raster)")
    if not hasattr(dataset, "meta"):
        raise ValueError("--tasks diffusion: the data set records no image tokenizer (CogView "
                         ".bin, or several folders); train on one LMDB written by preprocess")
    tokenizer = image_tokenizer_of(dataset.meta, f"--data-path {cfg.data_path[0]}")
    table = codebook(tokenizer)
    return ({"head": "denoise", "latent_channels": int(table.shape[1]),
             "latent_scale": latent_scale(table, dataset, train_idx),
             "latent_token": layout["[ENC]"], "noise_token": layout["[BOI1]"],
             "inpaint_channel": cfg.inpaint_masks > 0}, tokenizer)


def check_masking(cfg: TrainConfig, config) -> None:
    """--mask-ratio and --unmask-finetune-iters (MaskDiT, model/masked.py) in one line each."""
    if not 0 <= cfg.unmask_finetune_iters <= cfg.train_iters:
        raise ValueError(f"--unmask-finetune-iters {cfg.unmask_finetune_iters}: must be in "
                         f"[0, --train-iters {cfg.train_iters}]")
    if not (cfg.mask_ratio or cfg.unmask_finetune_iters):
        return
    if not config.latent_channels:
        raise ValueError("--mask-ratio / --unmask-finetune-iters: masked-patch training is a "
                         "denoiser's (--tasks diffusion or clip2latents)")
    if not config.decoder_layers:
        raise ValueError("--mask-ratio: the hidden patches are filled in by a mask decoder; add "
                         "--decoder-layers N (e.g. 1 or 2), and the same to the unmasked run you "
                         "compare with")
    if cfg.mask_ratio >= 1:
        raise ValueError(f"--mask-ratio {cfg.mask_ratio}: must be below 1 (the trunk reads at "
                         f"least one patch)")


def moving_average(cfg: TrainConfig, engine, state: dict, source: str | None):
    """The EMA of the weights (--ema-decay; None without), resumed from the checkpoint's state,
    else started from the weights as they are (fresh, fine-tuned, or a run that had none)."""
    if not cfg.ema_decay:
        return None
    ema = EMA(engine.module, cfg.ema_decay)
    if state.get(EMA_KEY):
        ema.load_state_dict(state[EMA_KEY], source)
    elif state:
        logger.warning("%s holds no moving average of the weights: starting one from its weights",
                       source)
    return ema


@torch.no_grad()
def init_trunk(model, cfg: TrainConfig, config, layout) -> None:
    """--init-trunk: copy the shared trunk of another checkpoint into this rank's model (a GPT or
    a pipeline stage) before the optimiser sees it; the task's own parts keep their
    initialisation."""
    from megatron_t2i.training.convert import trunk_shard
    shard = trunk_shard(cfg.init_trunk, config, layout, mpu.get_tensor_model_parallel_world_size(),
                        mpu.get_tensor_model_parallel_rank())
    from megatron_t2i.model.pipeline import gpt_key
    copied = []
    for key, tensor in model.state_dict().items():
        name = key if cfg.pipeline_model_parallel_size == 1 else gpt_key(key, config)
        if name in shard:
            tensor.copy_(shard[name])
            copied.append(name)
    condition = any(name.startswith("conditioning.") for name in copied)
    logger.info("trunk initialised from %s (%d tensors on this rank%s)", cfg.init_trunk,
                len(copied), ", the condition projector too" if condition else "")


def resume_dir(cfg: TrainConfig) -> str | None:
    """load, else save when it already holds a checkpoint (re-running resumes)."""
    if cfg.load:
        return cfg.load
    if cfg.save and os.path.isfile(os.path.join(cfg.save, ckpt.LATEST)):
        return cfg.save
    return None


def prepare(cfg: TrainConfig) -> Trainer:
    """Everything before the first step; collective (call on every rank)."""
    init_distributed(cfg.distributed_backend)
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    mpu.initialize_model_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    device = resolve_device()
    dataset, layout = open_dataset(list(cfg.data_path))
    train_idx, eval_idx = split_indices(len(dataset), cfg.holdout_fraction, cfg.seed)
    denoiser, image_tokenizer = denoiser_fields(cfg, dataset, layout, train_idx)
    config = model_config(cfg.model_size, layout, cfg.tensor_model_parallel_size, list(cfg.tasks),
                          **cfg.model_overrides, **condition_fields(cfg, dataset, layout),
                          **latent_fields(cfg, dataset, layout), **denoiser)
    config.check_tensor_parallel(cfg.tensor_model_parallel_size)
    check_masking(cfg, config)
    if cfg.pipeline_model_parallel_size > 1:
        from megatron_t2i.model.pipeline import check_pipeline_model
        check_pipeline_model(config)
    objective = build_objective(cfg.tasks, layout, cfg.txt_loss_scale,
                                kl_weight=cfg.cvae_kl_weight, kl_warmup=cfg.cvae_kl_warmup,
                                mask_loss_weight=cfg.mask_loss_weight)
    load_dir = resume_dir(cfg)
    if cfg.init_trunk and cfg.load:
        raise ValueError("--init-trunk and --load: a run starts from one checkpoint; --load "
                         "(with --finetune) takes a whole model, --init-trunk only its trunk")
    tag = ckpt.choose_checkpoint(load_dir, cfg.resume_fallback) if load_dir else None
    if load_dir:
        saved = ckpt.check_compatible(load_dir, config, layout, tag, cfg.finetune)[1]
        # what only the checkpoint knows: the grid its cell positions were learnt on (regrid.py)
        # and the latent space its denoiser was trained in (kept when fine-tuning on other data)
        config = replace(config, grid_base=saved.grid_base, **(
            {"latent_scale": saved.latent_scale} if saved.latent_channels else {}))
    latent_table = None if image_tokenizer is None else table_of(image_tokenizer, config)
    mpu.model_parallel_seed(cfg.seed)
    ds_config = load_ds_config(cfg)
    model = build_model(cfg, config, objective, ds_config)
    if cfg.init_trunk and not load_dir:  # a fresh start; resuming reads its own checkpoint
        init_trunk(model, cfg, config, layout)
    engine = build_engine(cfg, model, ds_config)
    iteration, consumed, state = 0, 0, {}
    if load_dir:
        state = ckpt.load_checkpoint(engine, load_dir, config, layout, finetune=cfg.finetune,
                                     tag=tag, trust=cfg.trust_checkpoint)
        iteration, consumed = state.get("iteration", 0), state.get("data", {}).get("consumed", 0)
        logger.info("%s from %s at iteration %d", "fine-tuning" if cfg.finetune else "resuming",
                    os.path.join(load_dir, tag), iteration)
    ema = moving_average(cfg, engine, state, load_dir and os.path.join(load_dir, tag))
    if rank == 0 and cfg.save and hasattr(dataset, "meta"):
        ckpt.store_tokenizers(cfg.save, dataset.meta)
    writer = None
    tb_dir = cfg.tensorboard_dir or (os.path.join(cfg.save, "tensorboard") if cfg.save else None)
    if rank == 0 and tb_dir:
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run replays the iterations after its checkpoint: drop what was logged of them
        writer = SummaryWriter(tb_dir, purge_step=iteration + 1 if iteration else None)
        drop_replayed_metrics(os.path.join(tb_dir, METRICS_FILE), iteration)
    reference = MatmulReference(precision(ds_config), device, cfg.peak_flops)
    if rank == 0:
        logger.info("model %s: %.1f M parameters | layout %s | %d train / %d held-out records "
                    "| world %d = TP %d x PP %d x DP %d | %s | MFU reference %.1f GFLOP/s (%s)",
                    cfg.model_size, config.num_parameters() / 1e6, layout.name, len(train_idx),
                    len(eval_idx), dist.get_world_size(), cfg.tensor_model_parallel_size,
                    cfg.pipeline_model_parallel_size, mpu.get_data_parallel_world_size(),
                    precision(ds_config), reference.rate / 1e9,
                    "--peak-flops" if cfg.peak_flops else "best matmul measured")
        if cfg.save:
            logger.info("checkpoints: %s | TensorBoard: %s", cfg.save, tb_dir)
        recommend_regularisation(cfg, config.hidden_dropout, len(train_idx))
    return Trainer(cfg, engine, config, layout, dataset, train_idx, eval_idx, writer, reference,
                   objective, iteration, consumed, latent_table, ema,
                   None if cfg.finetune else state.get(BEST_EVAL_KEY),
                   None if cfg.finetune else state.get(PROGRESS_KEY))


def recommend_regularisation(cfg: TrainConfig, hidden_dropout: float, train_records: int) -> None:
    """A data set small for the run's length is seen many times over: say what to expect."""
    global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * \
        mpu.get_data_parallel_world_size()
    epochs = cfg.train_iters * global_batch / max(1, train_records)
    if epochs > EPOCHS_WARNING:
        logger.info("the run reads each of the %d training records about %.0f times "
                    "(--train-iters %d x global batch %d): on so little data expect the held-out "
                    "loss to turn up before the end; the best checkpoint by held-out loss is kept "
                    "as `best` (generation: --checkpoint best). Against it: more data, "
                    "--hidden-dropout 0.2 (now %g), --weight-decay 0.1 (now %g), fewer "
                    "--train-iters", train_records, epochs, cfg.train_iters, global_batch,
                    hidden_dropout, cfg.weight_decay)
