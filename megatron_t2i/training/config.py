"""What a training run does, as one plain object: pretrain.py fills it from flags
(megatron_t2i/arguments.py), benchmarks and tests build it directly."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    data_path: tuple[str, ...] = ()                 # LMDB folders (or CogView .bin files)
    # the model: a named size (megatron_t2i/config.py) with field overrides
    model_size: str = "demo"
    model_overrides: dict = field(default_factory=dict)
    # what is trained
    tasks: dict = field(default_factory=lambda: {"text2image": 1.0})   # name -> weight
    text_dropout: float = 0.0                       # captions dropped, for guidance
    condition_slots: int = 4                        # slots a conditioned task's vector fills
    condition_noise: float = 0.0                    # LAFITE's xi on the CLIP image embedding
    txt_loss_scale: float = 1.0                     # caption targets of caption-first sequences
    cvae_latent_dim: int = 0                        # Lformer's CVAE latent (0: none)
    cvae_kl_weight: float = 1.0                     # beta of CE + beta KL, per token
    cvae_kl_warmup: int = 500                       # iterations of beta's linear ramp
    noise_beta: tuple[float, float] = (0.75, 0.75)  # a denoiser's noise levels ~ Beta(a, b)
    ema_decay: float = 0.0                          # EMA of the weights (0: none), e.g. 0.999
    mask_ratio: float = 0.0                         # MaskDiT: patches hidden from the trunk
    mask_loss_weight: float = 0.1                   # MaskDiT: the hidden patches' loss weight
    unmask_finetune_iters: int = 0                  # the last iterations train unmasked
    init_trunk: str | None = None                   # start the trunk from this checkpoint's
    inpaint_masks: float = 0.0                      # in/outpainting: share of samples given
                                                    # patches (> 0: the model's mask channel)
    holdout_fraction: float = 0.02
    seed: int = 1234
    # optimisation
    train_iters: int = 1000
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.1                             # share of train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    # precision and DeepSpeed
    fp16: bool = False
    bf16: bool = False
    zero_stage: int | None = None                   # default: the DeepSpeed JSON's, else 0
    deepspeed_config: str | None = None             # default: megatron_t2i/training/ds_config.json
    # parallel layout
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    distributed_backend: str | None = None          # default: nccl on GPUs, gloo on CPUs
    # checkpoints
    save: str | None = None
    load: str | None = None                         # default: resume from save
    finetune: bool = False                          # with load: weights only
    resume_fallback: bool = False                   # a damaged latest: take the previous one
    keep_checkpoints: int = 3
    trust_checkpoint: bool = False
    save_interval: int = 500
    # reporting
    log_interval: int = 10
    eval_interval: int = 200
    eval_iters: int = 10
    tensorboard_dir: str | None = None              # default: {save}/tensorboard
    peak_flops: float | None = None                 # MFU's denominator per device (a datasheet
    #                                                 peak); default: matmuls measured in the run
