"""Everything generation needs from a checkpoint folder: the model shard of this tensor-parallel
rank, its config and token layout, and the tokenizers it was trained with.

    model, config, layout, tokenizer_paths = load_model("checkpoints/demo", device)

Any tensor-parallel size: with torch.distributed and mpu initialised at TP=k, rank r reads only
mp_rank_{r} (or its pipeline layer files); the checkpoint must have been saved at TP=k, else
tools/convert_checkpoint.py reshards it. The model is built on the meta device and the weights
assigned, so no time goes into random initialisation of weights that are overwritten anyway.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.device import resolve_device
from megatron_t2i.generation.config import LoadConfig
from megatron_t2i.model.gpt import GPT
from megatron_t2i.safe_load import check_state_dict, deepspeed_safe_globals, load_torch_file
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.training.checkpoint import TOKENIZER_FILES, CheckpointError, checkpoint_folder
from megatron_t2i.training.convert import (check_finite, model_file, read_info,
                                           read_verified_info, with_stage_ema)
from megatron_t2i.training.ema import module_weights


def _shard_files(config: ModelConfig, meta: dict, rank: int) -> list[str]:
    """The files of the checkpoint folder that hold TP rank `rank`'s weights."""
    pp = int(meta.get("pipeline_model_parallel_size", 1))
    if pp > 1:
        from megatron_t2i.model.pipeline import layer_prefixes
        tp = int(meta.get("tensor_model_parallel_size", 1))
        return [f"layer_{index:02d}-model_{rank:02d}-model_states.pt"
                for index, prefix in enumerate(layer_prefixes(config)) if prefix] + \
            [model_file(stage * tp + rank) for stage in range(pp)]  # the stages' EMA
    return [model_file(rank)]


def _read_shard(folder: str, config: ModelConfig, meta: dict, rank: int,
                trust: bool = False, ema: bool = True) -> dict:
    """This TP rank's GPT state dict (CPU tensors, as stored); with `ema`, the moving average of
    the weights where the checkpoint holds one (training/ema.py)."""
    pp = int(meta.get("pipeline_model_parallel_size", 1))
    if pp > 1:
        from megatron_t2i.model.pipeline import gpt_state_dict_from_layer_files
        try:
            state = gpt_state_dict_from_layer_files(folder, config, rank, trust)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        tp = int(meta.get("tensor_model_parallel_size", 1))
        return with_stage_ema(state, folder, config, rank, tp, pp, trust) if ema else state
    path = os.path.join(folder, model_file(rank))
    return module_weights(load_torch_file(path, trust, deepspeed_safe_globals()), path, ema)


def offload_layers(model: GPT, device: torch.device) -> None:
    """Keep the transformer layers' weights on the CPU and copy each layer to `device` just before
    it runs, dropping the copy right after: GPU memory holds one layer (plus the embeddings, the
    final LayerNorm and the KV cache) instead of the whole model. For GPUs too small for the model;
    slower by one host-to-device copy of the weights per forward."""
    pin = device.type == "cuda"
    for layer in model.transformer.layers:
        params = list(layer.parameters())
        on_cpu = [p.data.cpu().pin_memory() if pin else p.data.cpu() for p in params]
        for p, data in zip(params, on_cpu):
            p.data = data

        def fetch(module, args, params=params, on_cpu=on_cpu):
            for p, data in zip(params, on_cpu):
                p.data = data.to(device, non_blocking=True)

        def release(module, args, output, params=params, on_cpu=on_cpu):
            for p, data in zip(params, on_cpu):
                p.data = data

        layer.register_forward_pre_hook(fetch)
        layer.register_forward_hook(release)


def load_model(load_dir: str, device="cpu", dtype: torch.dtype | None = None,
               offload: bool = False, trust: bool = False, ema: bool = True):
    """-> (GPT in eval mode on `device`, ModelConfig, TokenLayout, {"text"|"image": path} of the
    tokenizers stored with the checkpoint).

    load_dir: a --save folder (its `latest` is read) or one iter_XXXXXXX folder. dtype: default
    the stored dtype, except that fp16/bf16 weights become fp32 on the CPU (half-precision CPU
    matmuls are slow or missing). offload: see offload_layers (ignored on the CPU). trust: unpickle
    fully (--trust-checkpoint; see megatron_t2i/safe_load.py). ema: the checkpoint's moving
    average of the weights when it has one (--ema-decay in training), else the weights."""
    device = torch.device(device)
    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    _, config, _, meta = read_info(load_dir)  # which files to verify, then read them verified
    folder, config, layout, meta = read_verified_info(load_dir,
                                                      files=_shard_files(config, meta, rank))
    saved_tp = int(meta.get("tensor_model_parallel_size", 1))
    if saved_tp != tp:
        raise CheckpointError(
            f"{folder}: saved at tensor-parallel size {saved_tp}, this run has {tp} process(es) "
            f"per model; launch {saved_tp} (torchrun --nproc_per_node {saved_tp}) or reshard it: "
            f"python tools/convert_checkpoint.py reshard {load_dir} NEW_DIR --tp {tp}")
    # inference: no dropout, no recomputation
    config = replace(config, hidden_dropout=0.0, attention_dropout=0.0, checkpoint_activations=False)
    model = GPT(config, device="meta")
    state = _read_shard(folder, config, meta, rank, trust, ema)
    check_state_dict(state, model.state_dict(), f"{folder} (tensor-parallel rank {rank})")
    check_finite(state, f"{folder} (tensor-parallel rank {rank})")
    stored = state["word_embeddings.weight"].dtype
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" and stored in (torch.float16, torch.bfloat16) \
            else stored
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if offload and device.type != "cpu":
        offload_layers(model, device)
        for part in (model.word_embeddings, model.transformer.position_embeddings,
                     model.transformer.final_layernorm):  # everything but the layers: on the GPU
            part.to(device)
    else:
        model.to(device)
    save_dir = os.path.dirname(os.path.abspath(folder))
    tokenizers = {kind: path for kind, name in TOKENIZER_FILES.items()
                  if os.path.isfile(path := os.path.join(save_dir, "tokenizers", name))}
    return model, config, layout, tokenizers


# ----------------------------------------------------------------------------------------------
# Tokenizers and the context every task runs with

def load_tokenizers(layout: TokenLayout, text_path: str | None, image_path: str | None,
                    device="cpu", stored: dict | None = None, need_image: bool = True,
                    image_kind: str | None = None):
    """(TextTokenizer, ImageTokenizer or None) from the given paths, else the checkpoint's stored
    ones; refuses tokenizers whose vocabulary does not match the token layout, an image tokenizer
    of another kind (VQ-VAE / VQGAN) than the stored one, or than `image_kind` asks."""
    from megatron_t2i.tokenizers.text import TextTokenizer
    from megatron_t2i.tokenizers.vqvae import ImageTokenizer

    stored = stored or {}
    text_path = text_path or stored.get("text")
    if not text_path:
        raise FileNotFoundError("no text tokenizer: the checkpoint has no tokenizers/"
                                f"{TOKENIZER_FILES['text']}; pass --text-tokenizer FILE.model")
    text = TextTokenizer(text_path)
    if text.vocab_size != layout.num_text_tokens:
        raise ValueError(f"--text-tokenizer {text_path}: {text.vocab_size} text ids, the "
                         f"checkpoint's token layout has {layout.num_text_tokens}")
    if not need_image:
        return text, None
    given, image_path = image_path, image_path or stored.get("image")
    if not image_path:
        raise FileNotFoundError("no image tokenizer: the checkpoint has no tokenizers/"
                                f"{TOKENIZER_FILES['image']}; pass --image-tokenizer FILE.pt")
    image = ImageTokenizer.load(image_path, device).check_kind(image_kind)
    if given and stored.get("image"):  # codes of one kind mean nothing to a decoder of the other
        trained_on = ImageTokenizer.load(stored["image"]).kind
        if trained_on != image.kind:
            raise ValueError(f"--image-tokenizer {given}: a {image.kind} image tokenizer, the "
                             f"checkpoint was trained on the codes of a {trained_on} "
                             f"(tokenizers/{TOKENIZER_FILES['image']})")
    if image.codebook_size != layout.num_image_codes:
        raise ValueError(f"--image-tokenizer {image_path}: {image.codebook_size} codes, the "
                         f"checkpoint's token layout has {layout.num_image_codes}")
    return text, image.at_grid(layout.image_grid)  # a model moved to another grid: same networks


@dataclass
class GenerationContext:
    """What a task's `main_<task>(ctx, config)` works with. Every TP rank holds one; all ranks run
    the model together, only the writer (global rank 0) reads input and writes files."""
    model: GPT
    config: ModelConfig
    layout: TokenLayout
    text_tokenizer: object           # TextTokenizer
    image_tokenizer: object | None   # ImageTokenizer on the writer; None on the other ranks
    device: torch.device
    is_writer: bool
    clip: object | None = None       # Clip (tokenizers/clip.py), on every rank, when there is one
    folder: str = ""                 # the checkpoint folder loaded (iter_XXXXXXX)

    def encode_image_file(self, path: str) -> list[int]:
        """An image file -> its codes [grid^2] under the checkpoint's VQ-VAE (on the writer)."""
        from megatron_t2i.data.images import load_rgb
        try:
            image = load_rgb(path)
        except ValueError as e:  # unreadable or missing: load_rgb says which
            raise ValueError(f"{path}: {e}") from None
        return self.image_tokenizer.encode_images([image])[0].tolist()


DTYPES = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_context(load: LoadConfig) -> GenerationContext:
    """Model and tokenizers of a checkpoint folder (collective under TP)."""
    if not load.load:
        raise ValueError("--load DIR is required: a checkpoint folder (./scripts/"
                         "pretrain_single_node.sh writes checkpoints/demo)")
    device = resolve_device(load.device)
    folder = checkpoint_folder(load.load, load.checkpoint)
    model, config, layout, stored = load_model(folder, device, DTYPES[load.dtype], load.offload,
                                               load.trust_checkpoint, load.ema)
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    # a denoiser's samples become codes on every rank (its codebook snaps them)
    text, image = load_tokenizers(layout, load.text_tokenizer, load.image_tokenizer, device,
                                  stored, need_image=is_writer or bool(config.latent_channels),
                                  image_kind=load.image_tokenizer_kind)
    clip = load_clip(load.clip or stored.get("clip"), text, device, required=bool(
        config.condition_slots), trust=load.trust_checkpoint)
    if clip and config.condition_slots and clip.config.embed_dim != config.condition_dim:
        raise ValueError(f"--clip {clip.path}: embeddings of {clip.config.embed_dim} values, this "
                         f"checkpoint's condition takes {config.condition_dim} (another CLIP)")
    return GenerationContext(model, config, layout, text, image, device, is_writer, clip, folder)


def load_clip(path: str | None, text_tokenizer, device, required: bool = False,
              trust: bool = False):
    """The CLIP at `path` (None: no CLIP); a CLIP-conditioned model cannot sample without one."""
    if not path:
        if required:
            raise FileNotFoundError("this checkpoint is CLIP-conditioned (language-free) and has "
                                    f"no tokenizers/{TOKENIZER_FILES['clip']}; pass --clip FILE.pt")
        return None
    from megatron_t2i.tokenizers.clip import Clip
    return Clip.load(path, text_tokenizer, device, trust)
