"""The train / evaluate loop: batches, steps, logging, checkpoints, clean stops.

One iteration = one optimiser step = `gradient_accumulation_steps` micro-batches per data-parallel
rank. The loop owns no parallel logic: DeepSpeed averages gradients over data-parallel ranks, clips
and skips fp16 overflow steps; the objective (objectives.py) scores the outputs; this file feeds
batches, normalises the loss over the global batch and reports.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i.data.loader import (ResumableSampler, SequenceBuilder, collate, target_length,
                                      trim_padding)
from megatron_t2i.io_utils import write_text_atomic
from megatron_t2i.model.attention import block_causal_mask
from megatron_t2i.training.checkpoint import save_checkpoint
from megatron_t2i.training.ema import EMA_KEY
from megatron_t2i.training.engine import loss_scale
from megatron_t2i.training.flops import model_flops

logger = logging.getLogger("megatron_t2i.train")

METRICS_FILE = "metrics.jsonl"


class NonFiniteLoss(RuntimeError):
    pass


class StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the iteration."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("received %s: saving a checkpoint after this iteration",
                       signal.Signals(signum).name)

    def any_rank(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def drop_replayed_metrics(path: str, iteration: int) -> None:
    """Keep only the lines of metrics.jsonl up to `iteration` (where a run resumes): the
    iterations after it are trained, and logged, again."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _logged_at(line) <= iteration]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def _logged_at(line: str) -> float:
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped too


def _all_reduce_dp(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=mpu.get_data_parallel_group())
    return t


def step_flops(config, batch: dict) -> float:
    """The model FLOPs of training on a micro-batch (its trunk on the visible patches only)."""
    b, s = batch["tokens"].shape
    visible = batch.get("visible_patches")
    kept = None if visible is None else s - visible.shape[1] + int(visible[0].sum())
    return model_flops(config, b, s, kept)


def attention_mask(batch: dict) -> torch.Tensor | None:
    """The batch's attention mask: from its block ids, or None (causal) when it has none."""
    return block_causal_mask(batch["block_ids"]) if "block_ids" in batch else None


class Batches:
    """Micro-batches of one data-parallel rank, on the model's device, prepared for the
    objective; with `trim`, cut after the longest sequence (see trim_padding)."""

    def __init__(self, dataset, indices, builder: SequenceBuilder, micro_batch: int, seed: int,
                 device, objective, consumed: int = 0, trim: bool = False):
        self.dataset, self.builder, self.device, self.trim = dataset, builder, device, trim
        self.objective = objective
        self.sampler = ResumableSampler(indices, micro_batch, mpu.get_data_parallel_rank(),
                                        mpu.get_data_parallel_world_size(), seed, consumed)

    def next(self) -> dict[str, torch.Tensor]:
        seqs = []
        for index, sample_seed in self.sampler.next_micro_batch():
            record = self.dataset[index]
            seqs.append(self.builder(record.text_ids, record.image_codes, sample_seed,
                                     record.low_codes, record.arrays))
        batch = collate(seqs)
        if self.trim:
            # one length on every data-parallel replica: their dropout then draws as many random
            # numbers, so their RNG states stay equal (a checkpoint keeps one, see checkpoint.py)
            length = torch.tensor([target_length(batch["loss_mask"])], device=self.device)
            if dist.is_initialized() and mpu.get_data_parallel_world_size() > 1:
                dist.all_reduce(length, op=dist.ReduceOp.MAX, group=mpu.get_data_parallel_group())
            batch = trim_padding(batch, int(length))
        return self.objective.prepare({k: v.to(self.device, non_blocking=True)
                                       for k, v in batch.items()})


CONDITION_KEYS = ("condition", "condition_mask", "latent_source", "latent_noise", "latent_mask",
                  "noisy_latents", "noise_level", "visible_patches", "known_latents",
                  "known_mask")


def condition_inputs(batch: dict) -> dict:
    """The model's input keywords a batch has beside its tokens: a conditioned task's vector, a
    CVAE's latent inputs, a denoiser's noisy patches (GPT.forward); {} for plain sequences."""
    return {k: batch[k] for k in CONDITION_KEYS if k in batch}


def forward_loss(engine, batch, objective, weights=None):
    """-> (Σ weights·loss over the micro-batch, the objective's metric sums)."""
    outputs = engine(batch["tokens"], batch["position_ids"], attention_mask(batch),
                     **condition_inputs(batch))
    return objective.loss(outputs, batch, weights)


class PipelineLoss:
    """loss_fn of the pipeline's last stage: the objective's weighted sum with weights already
    normalised (labels = the objective's label_keys, "weights" scaled by the loop); keeps the
    metric sums for logging."""

    def __init__(self, objective):
        self.objective = objective
        self.sums = None

    def __call__(self, outputs, labels):
        batch = dict(zip(self.objective.label_keys, labels))
        weighted_sum, sums = self.objective.loss(outputs, batch)
        self.sums = sums if self.sums is None else self.sums + sums
        return weighted_sum

    def take(self, device) -> torch.Tensor:
        """This step's metric sums over every data-parallel replica, on every rank."""
        sums = self.sums if self.sums is not None else \
            torch.zeros(self.objective.metric_size, dtype=torch.float64)
        sums = sums.to(device)
        self.sums = None
        dist.all_reduce(sums)  # only last stages hold sums; their TP ranks hold copies
        return sums / mpu.get_tensor_model_parallel_world_size()


def inpaint_share(model_config, share: float) -> float | None:
    """The SequenceBuilder's inpaint_share: None for a model without an inpainting channel; its
    held-out batches are given nothing (0.0), so their loss compares with any denoiser's."""
    return share if model_config.inpaint_channel else None


def pipeline_inputs(batch: dict, config) -> tuple:
    """What the pipeline's first stage of a model of `config` (ModelConfig) reads: (tokens,
    position_ids[, block_ids]); of a conditioned model, (tokens, position_ids, condition,
    condition_mask, ...), a batch without conditioned rows reading none; of a denoiser, the noisy
    latents and noise level before the block ids (model/pipeline.py)."""
    tokens = batch["tokens"]
    condition = latents = ()
    if config.condition_dim:
        condition = (batch["condition"], batch["condition_mask"]) if "condition" in batch else \
            (tokens.new_zeros(len(tokens), config.condition_dim, dtype=torch.float),
             tokens.new_zeros(len(tokens), dtype=torch.bool))
    if config.latent_channels:
        latents = (batch["noisy_latents"], batch["noise_level"])
        if config.inpaint_channel:
            latents += (batch["known_latents"], batch["known_mask"])
    extra = (batch["block_ids"],) if "block_ids" in batch else ()
    return (tokens, batch["position_ids"]) + condition + latents + extra


class Trainer:
    def __init__(self, config, engine, model_config, layout, dataset, train_idx, eval_idx,
                 writer, reference, objective, start_iteration: int = 0, consumed: int = 0,
                 latent_table=None, ema=None, best_eval=None, progress=None):
        """config: TrainConfig; reference: the MFU denominator (flops.MatmulReference);
        latent_table: a denoiser's scaled codebook latents [K, d] (data/latents.py); ema: the
        moving average of the weights (training/ema.py), updated after every step; best_eval:
        (iteration, held-out loss) of the best evaluation so far (resumed from the checkpoint);
        progress: the run's cumulative training-step seconds and model FLOPs (all replicas) so
        far, logged with every line (a held-out loss against time or compute, e.g.
        bench/masked_diffusion.py), resumed from the checkpoint."""
        self.cfg, self.engine, self.config, self.layout = config, engine, model_config, layout
        self.ema = ema
        self.writer, self.reference, self.objective = writer, reference, objective
        self.iteration = start_iteration
        self.device = engine.device
        slots = model_config.condition_slots
        builder = SequenceBuilder(layout, config.tasks, config.text_dropout, slots,
                                  config.condition_noise, model_config.latent_dim, latent_table,
                                  config.noise_beta, config.mask_ratio,
                                  inpaint_share(model_config, config.inpaint_masks))
        self.pipeline_loss = getattr(engine.module, "loss_fn", None) \
            if mpu.get_pipeline_model_parallel_world_size() > 1 else None
        self.trim = self.pipeline_loss is None  # the pipeline engine wants fixed shapes
        self.train = Batches(dataset, train_idx, builder, config.micro_batch_size, config.seed,
                             self.device, objective, consumed, self.trim)
        self.eval_idx, self.dataset = eval_idx, dataset
        self.eval_builder = SequenceBuilder(layout, config.tasks, 0.0, slots,
                                            latent_dim=model_config.latent_dim,
                                            latent_table=latent_table,
                                            noise_beta=config.noise_beta,
                                            inpaint_share=inpaint_share(model_config, 0.0))
        self.stop = StopSignal()
        self.is_logger = not dist.is_initialized() or dist.get_rank() == 0
        self.work = [0, 0.0]  # tokens fed and their model FLOPs on this replica, since the last log
        self.last_eval = (-1, None)  # (iteration, held-out loss) of the latest evaluation
        self.best_eval = tuple(best_eval) if best_eval else None
        self.rise_explained = False  # the first warning of a rising held-out loss says why
        self.progress = {"train_seconds": 0.0, "model_flops": 0.0, **(progress or {})}

    # ---- one optimiser step ------------------------------------------------------------------
    def train_step(self):
        """One optimiser step. The objective is the weighted mean loss over every target of the
        global batch: each micro-batch's weighted sum is divided by the weight total of the
        whole global batch (one all-reduce), times the factor DeepSpeed divides by when it
        averages over accumulation steps and data-parallel ranks. So any split of the global
        batch over ranks and accumulation steps gives the same gradient."""
        gas = self.cfg.gradient_accumulation_steps
        self.objective.at_iteration(self.iteration)
        self.train.builder.mask_ratio = self.mask_ratio(self.iteration)
        batches = [self.train.next() for _ in range(gas)]
        for b in batches:
            flops = step_flops(self.config, b)
            self.work[0] += b["tokens"].numel()
            self.work[1] += flops
            self.progress["model_flops"] += flops * mpu.get_data_parallel_world_size()
        total = _all_reduce_dp(torch.stack([self.objective.weight(b) for b in batches])
                               .sum().double())
        scale = gas * mpu.get_data_parallel_world_size() / total.clamp_min(1e-12).item()
        if self.pipeline_loss is not None:
            return self._pipeline_step(batches, scale)
        sums = torch.zeros(self.objective.metric_size, dtype=torch.float64, device=self.device)
        objective = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            weighted_sum, s = forward_loss(self.engine, batch, self.objective)
            loss = weighted_sum * scale
            self._check_finite(loss, before_step=True)
            self.engine.backward(loss)
            self.engine.step()
            sums += s
            objective += weighted_sum.detach().double() / total
        self.iteration += 1
        if self.ema is not None:
            self.ema.update()
        return _all_reduce_dp(objective), _all_reduce_dp(sums)

    def mask_ratio(self, iteration: int) -> float:
        """The share of patches hidden in the step after `iteration` steps: --mask-ratio, 0 in
        the last --unmask-finetune-iters."""
        unmasked = iteration >= self.cfg.train_iters - self.cfg.unmask_finetune_iters
        return 0.0 if unmasked else self.cfg.mask_ratio

    def _pipeline_step(self, batches, scale: float):
        """DeepSpeed's pipeline engine runs the step's micro-batches through the stages; its
        returned loss is already the global objective (averaged over accumulation and DP)."""
        data = iter([(pipeline_inputs(b, self.config), self._labels(b, b["weights"] * scale))
                     for b in batches])
        loss = self.engine.train_batch(data_iter=data)
        self._check_finite(loss, before_step=False)
        self.iteration += 1
        if self.ema is not None:
            self.ema.update()
        return loss.detach().double(), self.pipeline_loss.take(self.device)

    def _labels(self, batch, weights) -> tuple:
        return tuple(weights if k == "weights" else batch[k] for k in self.objective.label_keys)

    def _check_finite(self, loss, before_step: bool) -> None:
        finite = torch.tensor([float(torch.isfinite(loss).all())], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() or self.engine.fp16_enabled():  # fp16: the loss scaler skips the step
            return
        state = ("weights are untouched" if before_step else
                 "this step may have reached the weights (pipeline engine)")
        raise NonFiniteLoss(f"non-finite loss at iteration {self.iteration + 1}; {state}. Resume "
                            f"from the last checkpoint with a lower --lr or --clip-grad, or use "
                            f"--fp16 dynamic loss scaling")

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        batches = Batches(self.dataset, self.eval_idx, self.eval_builder,
                          self.cfg.micro_batch_size, self.cfg.seed, self.device, self.objective,
                          trim=self.trim)
        sums = torch.zeros(self.objective.metric_size, dtype=torch.float64, device=self.device)
        if self.pipeline_loss is not None:
            data = [batches.next() for _ in range(self.cfg.eval_iters)]
            self.engine.eval_batch(iter([(pipeline_inputs(b, self.config),
                                          self._labels(b, b["weights"]))
                                         for b in data]), num_micro_batches=len(data))
            sums = self.pipeline_loss.take(self.device)
        else:
            for _ in range(self.cfg.eval_iters):
                sums += forward_loss(self.engine, batches.next(), self.objective)[1]
            sums = _all_reduce_dp(sums)
        self.engine.train()
        return {f"eval/{k}": v for k, v in self.objective.summary(sums.cpu()).items()}

    # ---- the loop ----------------------------------------------------------------------------
    def log(self, values: dict) -> None:
        """TensorBoard scalars, and one JSON line of full-precision values (metrics.jsonl)."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, self.iteration)
            with open(os.path.join(self.writer.log_dir, METRICS_FILE), "a") as f:
                f.write(json.dumps({"iteration": self.iteration, **values}) + "\n")

    def track_best(self, loss: float) -> bool:
        """Note a held-out loss; True when it is the best so far (the trainer then saves, so
        `best` names it). Says so when the loss has risen above its best: overfitting."""
        best = self.best_eval
        if best is not None and loss >= best[1]:
            if self.is_logger and loss > best[1] * (1 + RISE_WARNING):
                logger.warning(
                    "held-out loss %.4f at iteration %d is %.1f%% above its best, %.4f at "
                    "iteration %d%s", loss, self.iteration, 100 * (loss / best[1] - 1), best[1],
                    best[0], "" if self.rise_explained else
                    ": the model is overfitting its training data (or the learning rate is too "
                    "high). The best checkpoint is kept as `best` (sample it with --checkpoint "
                    "best); more data, more --hidden-dropout or --weight-decay, or fewer "
                    "--train-iters help")
                self.rise_explained = True
            return False
        self.best_eval = (self.iteration, loss)
        return True

    def save(self) -> None:
        loss = self.last_eval[1] if self.last_eval[0] == self.iteration else None
        state = {"data": self.train.sampler.state_dict(), BEST_EVAL_KEY: self.best_eval,
                 PROGRESS_KEY: self.progress}
        if self.ema is not None:
            state[EMA_KEY] = self.ema.state_dict()
        save_checkpoint(self.engine, self.cfg.save, self.iteration, self.config, self.layout,
                        state, self.cfg.train_iters,
                        heldout_loss=loss, keep=self.cfg.keep_checkpoints)
        if self.is_logger:
            logger.info("saved checkpoint iteration %d to %s", self.iteration, self.cfg.save)

    def _window_values(self, window: dict, seconds: float) -> dict:
        # per device: this replica's work x replicas / devices (replicas train equal shapes)
        share = mpu.get_data_parallel_world_size() / (dist.get_world_size()
                                                        if dist.is_initialized() else 1)
        summary = self.objective.summary(window["sums"])
        summary.pop("loss")  # the weighted objective below is the training loss
        return {
            "train/loss": window["loss"] / window["n"],
            **{f"train/{k}": v for k, v in summary.items()},
            "train/lr": self.engine.get_lr()[0],
            "train/loss_scale": loss_scale(self.engine),
            "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "train/skipped_steps": float(self.engine.skipped_steps),
            "speed/tokens_per_s": self.work[0] * mpu.get_data_parallel_world_size() / seconds,
            "speed/mfu": self.reference.mfu(self.work[1] * share / seconds),
            **self.progress_values(),
        }

    def progress_values(self) -> dict:
        return {f"progress/{k}": v for k, v in self.progress.items()}

    def run(self) -> str:
        """Train to train_iters; returns 'done' or 'stopped' (signal)."""
        cfg = self.cfg
        size = self.objective.metric_size

        def new_window():
            return {"loss": 0.0, "sums": torch.zeros(size, dtype=torch.float64), "n": 0,
                    "seconds": 0.0}

        window = new_window()
        start_iter, t_start = self.iteration, time.time()
        while self.iteration < cfg.train_iters:
            new_best = False
            started = time.time()
            loss, sums = self.train_step()
            window["loss"] += loss.item()  # (a sync: the step's time is all in)
            step_seconds = time.time() - started
            window["seconds"] += step_seconds
            self.progress["train_seconds"] += step_seconds
            window["sums"] += sums.cpu()
            window["n"] += 1
            if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                now = time.time()
                values = self._window_values(window, window["seconds"])
                self.log(values)
                if self.is_logger:
                    done = self.iteration - start_iter
                    eta = (now - t_start) / done * (cfg.train_iters - self.iteration)
                    parts = " | ".join(f"{k[6:].replace('_loss', '')} {v:.4f}"
                                       for k, v in values.items()
                                       if k.startswith("train/") and (k.endswith("_loss")
                                                                      or k == "train/kl"))
                    logger.info(
                        "iteration %d/%d | loss %.6f | %s | lr %.3e | scale %g | grad-norm %.3f | "
                        "skipped %d | %.0f tokens/s | MFU %.3f | %.2f s/it | ETA %s",
                        self.iteration, cfg.train_iters, values["train/loss"], parts,
                        values["train/lr"], values["train/loss_scale"], values["train/grad_norm"],
                        self.engine.skipped_steps, values["speed/tokens_per_s"],
                        values["speed/mfu"], window["seconds"] / window["n"], _hms(eta))
                window = new_window()
                self.work = [0, 0.0]
            if self.eval_idx.size and cfg.eval_iters and (
                    self.iteration % cfg.eval_interval == 0 or self.iteration == cfg.train_iters):
                values = self.evaluate()
                self.last_eval = (self.iteration, values["eval/loss"])
                self.log({**values, **self.progress_values()})
                if self.is_logger:
                    logger.info("evaluation at iteration %d | %s", self.iteration,
                                " | ".join(f"{k[5:]} {v:.6f}" for k, v in values.items()))
                new_best = self.track_best(values["eval/loss"])
            stopping = self.stop.any_rank(self.device)
            if cfg.save and (stopping or self.iteration % cfg.save_interval == 0 or new_best
                             or self.iteration == cfg.train_iters):
                self.save()
            if stopping:
                return "stopped"
        return "done"


BEST_EVAL_KEY = "best_eval"  # client state: (iteration, held-out loss) of the best evaluation
PROGRESS_KEY = "progress"    # client state: cumulative training-step seconds and model FLOPs
RISE_WARNING = 0.005         # a held-out loss this far above its best is reported


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
