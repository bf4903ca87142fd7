"""The train / evaluate loop: batches, steps, logging, checkpoints, clean stops.

One iteration = one optimiser step = `gradient_accumulation_steps` micro-batches per data-parallel
rank. The loop owns no parallel logic: DeepSpeed averages gradients over data-parallel ranks, clips
and skips fp16 overflow steps; this file feeds batches, weighs the loss and reports.
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
from megatron_t2i.training.checkpoint import save_checkpoint
from megatron_t2i.training.engine import loss_scale
from megatron_t2i.training.flops import model_flops_per_token

logger = logging.getLogger("megatron_t2i.train")


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


METRICS_FILE = "metrics.jsonl"


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


class Batches:
    """Micro-batches of one data-parallel rank, on the model's device; with `trim`, cut after
    the longest sequence (see trim_padding)."""

    def __init__(self, dataset, indices, builder: SequenceBuilder, micro_batch: int, seed: int,
                 device, consumed: int = 0, trim: bool = False):
        self.dataset, self.builder, self.device, self.trim = dataset, builder, device, trim
        self.sampler = ResumableSampler(indices, micro_batch, mpu.get_data_parallel_rank(),
                                        mpu.get_data_parallel_world_size(), seed, consumed)

    def next(self) -> dict[str, torch.Tensor]:
        seqs = []
        for index, sample_seed in self.sampler.next_micro_batch():
            record = self.dataset[index]
            seqs.append(self.builder(record.text_ids, record.image_codes, sample_seed,
                                     record.low_codes))
        batch = collate(seqs)
        if self.trim:
            # one length on every data-parallel replica: their dropout then draws as many random
            # numbers, so their RNG states stay equal (a checkpoint keeps one, see checkpoint.py)
            length = torch.tensor([target_length(batch["loss_mask"])], device=self.device)
            if dist.is_initialized() and mpu.get_data_parallel_world_size() > 1:
                dist.all_reduce(length, op=dist.ReduceOp.MAX, group=mpu.get_data_parallel_group())
            batch = trim_padding(batch, int(length))
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def loss_weights(batch, layout, txt_loss_scale: float) -> torch.Tensor:
    """Loss mask with the text targets of caption-first sequences (text->image, super-resolution:
    those starting with [ROI1]) weighted by --txt-loss-scale. In the caption direction the text is
    what the model is trained to write, so its targets keep weight 1."""
    is_image = batch["labels"] < layout.num_image_codes
    caption_first = batch["tokens"][:, :1] == layout["[ROI1]"]            # [B, 1]
    scale = torch.where(is_image | ~caption_first, 1.0, txt_loss_scale)
    return batch["loss_mask"] * scale


def token_losses(logits, labels, loss_mask, num_image_codes: int):
    """-> (per-token loss [B, S], [image loss sum, image count, text loss sum, text count])."""
    per_token = mpu.vocab_parallel_cross_entropy(logits.float(), labels)
    with torch.no_grad():
        mask = loss_mask > 0
        image = mask & (labels < num_image_codes)
        text = mask & ~image
        parts = torch.stack([(per_token * image).sum(), image.sum(), (per_token * text).sum(),
                             text.sum()]).double()
    return per_token, parts


def forward_loss(engine, batch, weights, layout):
    """-> (Σ weights·loss over the micro-batch, loss parts for logging)."""
    logits = engine(batch["tokens"], batch["position_ids"])
    per_token, parts = token_losses(logits, batch["labels"], batch["loss_mask"],
                                    layout.num_image_codes)
    return (per_token * weights).sum(), parts


class PipelineLoss:
    """loss_fn of the pipeline's last stage: the weighted sum with weights already normalised
    (labels = (labels, loss_mask, weights)); keeps the loss parts for logging."""

    def __init__(self, num_image_codes: int):
        self.num_image_codes = num_image_codes
        self.parts = None

    def __call__(self, logits, labels):
        targets, loss_mask, weights = labels
        per_token, parts = token_losses(logits, targets, loss_mask, self.num_image_codes)
        self.parts = parts if self.parts is None else self.parts + parts
        return (per_token * weights).sum()

    def take(self, device) -> torch.Tensor:
        """This step's parts summed over every data-parallel replica, on every rank."""
        parts = self.parts if self.parts is not None else torch.zeros(4, dtype=torch.float64)
        parts = parts.to(device)
        self.parts = None
        dist.all_reduce(parts)  # only last stages hold parts; their TP ranks hold copies
        return parts / mpu.get_tensor_model_parallel_world_size()


class Trainer:
    def __init__(self, args, engine, model_config, layout, dataset, train_idx, eval_idx, writer,
                 matmul_rate: float, start_iteration: int = 0, consumed: int = 0):
        self.args, self.engine, self.config, self.layout = args, engine, model_config, layout
        self.writer, self.matmul_rate = writer, matmul_rate
        self.iteration = start_iteration
        self.device = engine.device
        builder = SequenceBuilder(layout, args.tasks, args.text_dropout)
        self.pipeline_loss = getattr(engine.module, "loss_fn", None) \
            if mpu.get_pipeline_model_parallel_world_size() > 1 else None
        self.trim = self.pipeline_loss is None  # the pipeline engine wants fixed shapes
        self.train = Batches(dataset, train_idx, builder, args.micro_batch_size, args.seed,
                             self.device, consumed, self.trim)
        self.eval_idx, self.dataset = eval_idx, dataset
        self.eval_builder = SequenceBuilder(layout, args.tasks, 0.0)
        self.stop = StopSignal()
        self.is_logger = not dist.is_initialized() or dist.get_rank() == 0
        self.work = [0, 0.0]  # tokens fed and their model FLOPs on this replica, since the last log
        self.last_eval = (-1, None)  # (iteration, held-out loss) of the latest evaluation

    # ---- one optimiser step ------------------------------------------------------------------
    def train_step(self):
        """One optimiser step. The objective is the weighted mean loss over every target token of
        the global batch: each micro-batch's weighted sum is divided by the weight total of the
        whole global batch (one all-reduce), times the factor DeepSpeed divides by when it
        averages over accumulation steps and data-parallel ranks. So any split of the global
        batch over ranks and accumulation steps gives the same gradient."""
        gas = self.args.gradient_accumulation_steps
        batches = [self.train.next() for _ in range(gas)]
        for b in batches:
            self.work[0] += b["tokens"].numel()
            self.work[1] += model_flops_per_token(self.config, b["tokens"].shape[1]) \
                * b["tokens"].numel()
        weights = [loss_weights(b, self.layout, self.args.txt_loss_scale)
                   for b in batches]
        total = _all_reduce_dp(torch.stack([w.sum() for w in weights]).sum().double())
        scale = gas * mpu.get_data_parallel_world_size() / total.clamp_min(1e-12).item()
        if self.pipeline_loss is not None:
            return self._pipeline_step(batches, [w * scale for w in weights])
        parts = torch.zeros(4, dtype=torch.float64, device=self.device)
        objective = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, w in zip(batches, weights):
            weighted_sum, p = forward_loss(self.engine, batch, w, self.layout)
            loss = weighted_sum * scale
            self._check_finite(loss, before_step=True)
            self.engine.backward(loss)
            self.engine.step()
            parts += p
            objective += weighted_sum.detach().double() / total
        self.iteration += 1
        return _all_reduce_dp(objective), _all_reduce_dp(parts)

    def _pipeline_step(self, batches, weights):
        """DeepSpeed's pipeline engine runs the step's micro-batches through the stages; its
        returned loss is already the global objective (averaged over accumulation and DP)."""
        data = iter([((b["tokens"], b["position_ids"]), (b["labels"], b["loss_mask"], w))
                     for b, w in zip(batches, weights)])
        loss = self.engine.train_batch(data_iter=data)
        self._check_finite(loss, before_step=False)
        self.iteration += 1
        return loss.detach().double(), self.pipeline_loss.take(self.device)

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
        batches = Batches(self.dataset, self.eval_idx, self.eval_builder, self.args.micro_batch_size,
                          self.args.seed, self.device, trim=self.trim)
        parts = torch.zeros(4, dtype=torch.float64, device=self.device)
        if self.pipeline_loss is not None:
            data = [batches.next() for _ in range(self.args.eval_iters)]
            self.engine.eval_batch(iter([((b["tokens"], b["position_ids"]),
                                          (b["labels"], b["loss_mask"], b["loss_mask"]))
                                         for b in data]), num_micro_batches=len(data))
            parts = self.pipeline_loss.take(self.device)
        else:
            for _ in range(self.args.eval_iters):
                batch = batches.next()
                parts += forward_loss(self.engine, batch, batch["loss_mask"], self.layout)[1]
            parts = _all_reduce_dp(parts)
        self.engine.train()
        return {"eval/image_loss": (parts[0] / parts[1].clamp_min(1)).item(),
                "eval/text_loss": (parts[2] / parts[3].clamp_min(1)).item(),
                "eval/loss": ((parts[0] + parts[2]) / (parts[1] + parts[3]).clamp_min(1)).item()}

    # ---- the loop ----------------------------------------------------------------------------
    def log(self, values: dict) -> None:
        """TensorBoard scalars, and one JSON line of full-precision values (metrics.jsonl)."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, self.iteration)
            with open(os.path.join(self.writer.log_dir, METRICS_FILE), "a") as f:
                f.write(json.dumps({"iteration": self.iteration, **values}) + "\n")

    def save(self) -> None:
        loss = self.last_eval[1] if self.last_eval[0] == self.iteration else None
        save_checkpoint(self.engine, self.args.save, self.iteration, self.config, self.layout,
                        {"data": self.train.sampler.state_dict()}, self.args.train_iters,
                        heldout_loss=loss, keep=self.args.keep_checkpoints)
        if self.is_logger:
            logger.info("saved checkpoint iteration %d to %s", self.iteration, self.args.save)

    def run(self) -> str:
        """Train to --train-iters; returns 'done' or 'stopped' (signal)."""
        args = self.args
        # per device: this replica's work x replicas / devices (replicas train equal shapes)
        share = mpu.get_data_parallel_world_size() / (dist.get_world_size()
                                                        if dist.is_initialized() else 1)
        window = {"loss": 0.0, "parts": torch.zeros(4, dtype=torch.float64), "n": 0}
        start_iter, t_start, t_window = self.iteration, time.time(), time.time()
        while self.iteration < args.train_iters:
            loss, parts = self.train_step()
            window["loss"] += loss.item()
            window["parts"] += parts.cpu()
            window["n"] += 1
            if self.iteration % args.log_interval == 0 or self.iteration == args.train_iters:
                now = time.time()
                per_iter = (now - t_window) / window["n"]
                p = window["parts"]
                flops = self.work[1] * share / (now - t_window)
                values = {
                    "train/loss": window["loss"] / window["n"],
                    "train/image_loss": (p[0] / p[1].clamp_min(1)).item(),
                    "train/text_loss": (p[2] / p[3].clamp_min(1)).item(),
                    "train/lr": self.engine.get_lr()[0],
                    "train/loss_scale": loss_scale(self.engine),
                    "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "train/skipped_steps": float(self.engine.skipped_steps),
                    "speed/tokens_per_s": self.work[0] * mpu.get_data_parallel_world_size()
                                          / (now - t_window),
                    "speed/mfu": flops / self.matmul_rate,
                }
                self.log(values)
                if self.is_logger:
                    done = self.iteration - start_iter
                    eta = (now - t_start) / done * (args.train_iters - self.iteration)
                    logger.info(
                        "iteration %d/%d | loss %.6f | image %.4f | text %.4f | lr %.3e | "
                        "scale %g | grad-norm %.3f | skipped %d | %.0f tokens/s | MFU %.3f | "
                        "%.2f s/it | ETA %s", self.iteration, args.train_iters,
                        values["train/loss"], values["train/image_loss"], values["train/text_loss"],
                        values["train/lr"], values["train/loss_scale"], values["train/grad_norm"],
                        self.engine.skipped_steps, values["speed/tokens_per_s"],
                        values["speed/mfu"], per_iter, _hms(eta))
                window = {"loss": 0.0, "parts": torch.zeros(4, dtype=torch.float64), "n": 0}
                self.work = [0, 0.0]
                t_window = time.time()
            if self.eval_idx.size and args.eval_iters and (
                    self.iteration % args.eval_interval == 0 or self.iteration == args.train_iters):
                values = self.evaluate()
                self.last_eval = (self.iteration, values["eval/loss"])
                self.log(values)
                if self.is_logger:
                    logger.info("evaluation at iteration %d | loss %.6f | image %.4f | text %.4f",
                                self.iteration, values["eval/loss"], values["eval/image_loss"],
                                values["eval/text_loss"])
            stopping = self.stop.any_rank(self.device)
            if args.save and (stopping or self.iteration % args.save_interval == 0
                              or self.iteration == args.train_iters):
                self.save()
            if stopping:
                return "stopped"
        return "done"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
