"""Checkpoints that never lose work: DeepSpeed's layout, published atomically.

    {save}/
      latest                     the tag of the newest complete checkpoint (written last, atomically)
      iter_0000100/              DeepSpeed's files: mp_rank_XX_model_states.pt (weights under
                                 'module' + our client state), ZeRO optimiser shards, or per-layer
                                 files with pipeline parallelism
        model_config.json        ModelConfig
        token_layout.json        TokenLayout
        meta.json                iteration (of train_iters) and the parallel layout it was saved with

A save writes into `iter_XXXXXXX.partial/`, renames it to `iter_XXXXXXX/` once every rank has
finished, and only then replaces `latest`. A crash at any point leaves `latest` naming a complete
checkpoint. Resume restores weights, optimiser, LR schedule, loss scaler, RNG states (default and
tensor-parallel tracker) and the data position, so the loss trajectory continues exactly.

Trust and integrity: every save ends with a manifest of its files (manifest.py); resuming,
fine-tuning, generation and conversion check it first and name the first damaged file in one
line. Training then offers the newest intact checkpoint before it (`--resume-fallback` takes
it). Files are unpickled by the safe loader only (safe_load.py), DeepSpeed's reads included,
and the loaded weights must be finite. `--keep-checkpoints N` keeps the newest N and the one of
lowest held-out loss (`best`, a tag file beside `latest`); older ones are removed after each save.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.io_utils import (read_json, replace_folder, write_bytes_atomic,
                                   write_json_atomic, write_text_atomic)
from megatron_t2i.safe_load import deepspeed_safe_globals, guarded_torch_load
from megatron_t2i.tokenizers.layout import LayoutMismatchError, TokenLayout
from megatron_t2i.training import manifest

logger = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
_TAG = re.compile(r"iter_(\d{7,})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the path and the field."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def publish_checkpoint(save_dir: str, tag: str, model_config: ModelConfig, layout: TokenLayout,
                       meta: dict, checksums: dict | None = None) -> str:
    """Complete the folder `{save_dir}/{tag}.partial` (whose weight files are written) with the
    JSONs and the manifest (`checksums`: entries computed already), rename it to
    `{save_dir}/{tag}` and only then point `latest` at it. One process."""
    partial, final = os.path.join(save_dir, f"{tag}.partial"), os.path.join(save_dir, tag)
    model_config.save(os.path.join(partial, "model_config.json"))
    layout.save(os.path.join(partial, "token_layout.json"))
    write_json_atomic(os.path.join(partial, "meta.json"), meta)
    manifest.write_manifest(partial, checksums)
    replace_folder(partial, final)
    for name in ("model_config.json", "token_layout.json"):  # beside, for tools and humans
        with open(os.path.join(final, name), "rb") as f:
            write_bytes_atomic(os.path.join(save_dir, name), f.read())
    write_text_atomic(os.path.join(save_dir, LATEST), tag)
    return final


def read_latest(load_dir: str, which: str = LATEST) -> str:
    """The tag named by `{load_dir}/latest` (or `best`)."""
    path = os.path.join(load_dir, which)
    try:
        with open(path) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"--load {load_dir}: no '{which}' file, so no "
                              f"{'complete' if which == LATEST else 'best'} checkpoint is there") \
            from None
    if not tag or not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint folder")
    return tag


def checkpoint_folder(load_dir: str, which: str = LATEST) -> str:
    """The checkpoint folder (iter_XXXXXXX) that `which` (latest or best) of a --save folder
    names; a checkpoint folder itself is taken as it is (for latest)."""
    if which not in (LATEST, BEST):
        raise ValueError(f"--checkpoint {which}: expected {LATEST} or {BEST}")
    if os.path.isfile(os.path.join(load_dir, "meta.json")):
        if which == BEST:
            raise CheckpointError(f"--load {load_dir} is one checkpoint; --checkpoint best needs "
                                  f"its --save folder ({os.path.dirname(os.path.abspath(load_dir))})")
        return load_dir
    if which == LATEST and not os.path.isfile(os.path.join(load_dir, LATEST)):
        return load_dir  # not ours: the loader says what it is
    return os.path.join(load_dir, read_latest(load_dir, which))


def published_tags(save_dir: str) -> list[str]:
    """The complete checkpoint folders of save_dir, oldest first."""
    names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    return sorted((n for n in names if _TAG.fullmatch(n)
                   and os.path.isfile(os.path.join(save_dir, n, "meta.json"))),
                  key=lambda n: int(n[5:]))


def choose_checkpoint(load_dir: str, fallback: bool = False) -> str:
    """The tag to resume from: `latest`, verified against its manifest (every rank checks a
    share; collective). A damaged one is one line naming the file and the newest intact
    checkpoint before it, which fallback=True (--resume-fallback) takes instead."""
    tag = read_latest(load_dir)
    try:
        _verify(os.path.join(load_dir, tag))
        return tag
    except manifest.DamagedCheckpoint as damaged:
        older = [t for t in published_tags(load_dir) if int(t[5:]) < int(tag[5:])]
        for previous in reversed(older):
            try:
                _verify(os.path.join(load_dir, previous))
            except manifest.DamagedCheckpoint:
                continue
            if fallback:
                logger.warning("%s; resuming from the previous complete checkpoint %s "
                               "(--resume-fallback)", damaged, previous)
                return previous
            raise CheckpointError(f"{damaged}; the previous complete checkpoint is "
                                  f"{os.path.join(load_dir, previous)}: add --resume-fallback to "
                                  f"resume from it") from None
        raise CheckpointError(f"{damaged}; no intact checkpoint before it in {load_dir}") from None


def _verify(folder: str) -> None:
    if not manifest.verify(folder, shared=True):
        logger.warning("%s: no %s (saved before checkpoints had one): its files are not "
                       "verified", folder, manifest.MANIFEST)


def rng_state() -> dict:
    # tensors only, so the weights file stays loadable with torch.load(weights_only=True); numpy
    # and python RNGs are not used in training (the sampler seeds its own generators)
    state = {"torch": torch.get_rng_state(), "tracker": mpu.get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    mpu.get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, save_dir: str, iteration: int, model_config: ModelConfig,
                    layout: TokenLayout, client_state: dict, train_iters: int | None = None,
                    heldout_loss: float | None = None, keep: int = 0) -> str:
    """Save on every rank (collective); returns the published folder. meta.json records the
    --train-iters of the run, so a launcher can tell a finished run from an interrupted one,
    and the held-out loss measured at this iteration, if any. keep > 0: then remove all but the
    newest `keep` checkpoints and the best (see prune_checkpoints)."""
    tag = tag_for(iteration)
    final = os.path.join(save_dir, tag)
    partial_tag = f"{tag}.partial"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(os.path.join(save_dir, partial_tag), ignore_errors=True)  # an earlier crash
    _barrier()
    state = {**client_state, "iteration": iteration, "rng": rng_state()}
    engine.save_checkpoint(save_dir, tag=partial_tag, client_state=state, save_latest=False)
    _barrier()
    folder = os.path.join(save_dir, partial_tag)
    checksums = manifest.entries(folder, manifest.list_files(folder), shared=True)
    if _rank() == 0:
        publish_checkpoint(save_dir, tag, model_config, layout, {
            "iteration": iteration,
            "train_iters": train_iters,
            "tensor_model_parallel_size": mpu.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": mpu.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": mpu.get_data_parallel_world_size(),
            "zero_stage": engine.zero_optimization_stage(),
            "heldout_loss": heldout_loss,
        }, checksums)
        update_best(save_dir)
        if keep:
            prune_checkpoints(save_dir, keep)
    _barrier()
    return final


def update_best(save_dir: str) -> str | None:
    """Point `{save_dir}/best` at the checkpoint of lowest held-out loss (if any has one)."""
    scored = []
    for tag in published_tags(save_dir):
        try:
            loss = read_json(os.path.join(save_dir, tag, "meta.json"), expect=dict).get("heldout_loss")
        except ValueError:
            continue
        if isinstance(loss, (int, float)):
            scored.append((loss, -int(tag[5:]), tag))
    if not scored:
        return None
    best = min(scored)[2]
    write_text_atomic(os.path.join(save_dir, BEST), best)
    return best


def prune_checkpoints(save_dir: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` complete checkpoints and those `latest` and `best` name;
    returns the tags removed. One process."""
    tags = published_tags(save_dir)
    protected = set(tags[-keep:])
    for name in (LATEST, BEST):
        try:
            protected.add(read_latest(save_dir, name))
        except CheckpointError:
            pass
    removed = [t for t in tags if t not in protected]
    for tag in removed:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
    return removed


def read_checkpoint_info(load_dir: str, tag: str | None = None):
    """(tag, ModelConfig, TokenLayout, meta) of a checkpoint, without loading weights."""
    tag = tag or read_latest(load_dir)
    folder = os.path.join(load_dir, tag)
    try:
        config = ModelConfig.load(os.path.join(folder, "model_config.json"))
        layout = TokenLayout.load(os.path.join(folder, "token_layout.json"))
        meta = read_json(os.path.join(folder, "meta.json"), expect=dict)
    except FileNotFoundError as e:
        missing = os.path.basename(getattr(e, "path", None) or e.filename or "a file")
        raise CheckpointError(f"{folder}: missing {missing}; not a "
                              f"megatron_t2i checkpoint (CogView releases need importing first)") \
            from None
    return tag, config, layout, meta


def check_compatible(load_dir: str, config: ModelConfig, layout: TokenLayout, tag=None,
                     finetune: bool = False) -> tuple[str, ModelConfig, dict]:
    """Refuse a checkpoint of another vocabulary, layout or model shape with one clear line. A
    fine-tune may add a denoiser's inpainting channel (zero-initialised weights of its own).
    Returns the checkpoint's (tag, model config, meta)."""
    tag, saved_config, saved_layout, meta = read_checkpoint_info(load_dir, tag)
    where = os.path.join(load_dir, tag)
    tp = mpu.get_tensor_model_parallel_world_size()
    saved_tp = meta.get("tensor_model_parallel_size")
    if saved_tp != tp:
        raise CheckpointError(f"{where}: saved at tensor-parallel size {saved_tp}, this run uses "
                              f"{tp}; convert it first: python tools/convert_checkpoint.py "
                              f"reshard {load_dir} NEW_DIR --tp {tp}")
    try:
        layout.check_compatible(saved_layout, where)
    except LayoutMismatchError as e:
        raise CheckpointError(str(e)) from None
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "vocab_size", "max_position_embeddings", "sandwich_ln", "condition_dim",
                  "condition_slots", "latent_channels", "decoder_layers", "mlp_conv",
                  "inpaint_channel"):
        ours, theirs = getattr(config, field), getattr(saved_config, field)
        if ours != theirs and not (field == "inpaint_channel" and ours and finetune):
            hint = " (fine-tune with --inpaint-masks to keep it)" \
                if field == "inpaint_channel" else ""
            raise CheckpointError(f"{where}: model {field} is {theirs}, this run's is "
                                  f"{ours}{hint}")
    return tag, saved_config, meta


def load_checkpoint(engine, load_dir: str, config: ModelConfig, layout: TokenLayout,
                    finetune: bool = False, tag: str | None = None, trust: bool = False) -> dict:
    """Resume (everything) or, with finetune, take the weights only, from checkpoint `tag`
    (default: latest; verify it first with choose_checkpoint). Every file DeepSpeed reads goes
    through the safe loader (trust=True: full unpickling, --trust-checkpoint). Returns the client
    state ({} for finetune). On every rank (collective)."""
    tag, saved_config, meta = check_compatible(load_dir, config, layout, tag, finetune)
    # the only weights a fine-tune may add: the inpainting channel's (zero-initialised)
    strict = not (config.inpaint_channel and not saved_config.inpaint_channel)
    if not finetune and meta.get("weights_only"):
        raise CheckpointError(f"{os.path.join(load_dir, tag)}: holds weights only (written by "
                              f"tools/convert_checkpoint.py); start from it with --finetune")
    with guarded_torch_load(trust, deepspeed_safe_globals()):
        path, client_state = engine.load_checkpoint(
            load_dir, tag=tag, load_module_strict=strict, load_module_only=finetune,
            load_optimizer_states=not finetune, load_lr_scheduler_states=not finetune)
    if path is None:
        raise CheckpointError(f"{os.path.join(load_dir, tag)}: DeepSpeed found no checkpoint "
                              f"files for this parallel layout")
    check_finite(engine.module, os.path.join(load_dir, tag))
    if finetune:
        refresh_master_weights(engine)
        return {}
    set_rng_state(client_state["rng"])
    return client_state


def check_finite(module: torch.nn.Module, source: str) -> None:
    """Refuse weights with NaN or infinity (a damaged file no checksum covered); collective."""
    bad = next((n for n, p in module.named_parameters() if not torch.isfinite(p).all()), None)
    flag = torch.tensor([0.0 if bad is None else 1.0])
    if dist.is_initialized():
        flag = flag.to(next(module.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise CheckpointError(f"{source}: the loaded weights hold non-finite values"
                              + (f" ({bad})" if bad else " (on another rank)")
                              + "; the checkpoint is damaged")


def refresh_master_weights(engine) -> None:
    """After loading weights only, the fp32 master copy of a mixed-precision optimiser still holds
    the initial weights (the original CogView's fine-tuning bug). Copy the loaded weights in."""
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()


TOKENIZER_FILES = {"text": "text.model", "image": "vqvae.pt", "clip": "clip.pt"}


def store_tokenizers(save_dir: str, data_meta: dict) -> dict:
    """Copy the data set's tokenizers into {save}/tokenizers/ (once, atomically), so a checkpoint
    folder is all generation needs. Returns {kind: path} of what is there."""
    folder = os.path.join(save_dir, "tokenizers")
    os.makedirs(folder, exist_ok=True)
    stored = {}
    for kind, name in TOKENIZER_FILES.items():
        target = os.path.join(folder, name)
        source = data_meta.get("report", {}).get(f"{kind}_tokenizer_path")
        want = data_meta.get(f"{kind}_tokenizer_sha256")
        if not os.path.isfile(target) and source and os.path.isfile(source):
            with open(source, "rb") as f:
                blob = f.read()
            if want and hashlib.sha256(blob).hexdigest() != want:
                continue  # the file changed since preprocessing: not the data set's tokenizer
            write_bytes_atomic(target, blob)
        if os.path.isfile(target):
            stored[kind] = target
    return stored
