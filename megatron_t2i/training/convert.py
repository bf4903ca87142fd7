"""Offline checkpoint tools: merge tensor-parallel shards, reshard, export the fp32 master weights
of ZeRO shards, import and export CogView releases. One process on the CPU, no torch.distributed.

Everything meets in one form, the *full state dict*: GPT keys, TP=1 shapes, fp32 CPU tensors.

    load_full_state_dict(dir)        our checkpoint at any TP (PP: the pipeline layer files)
    merge_zero_to_fp32(dir)          the fp32 master weights held by ZeRO 1/2 optimiser shards
    save_model_checkpoint(dir, ...)  a weights-only checkpoint in our layout at any TP, which
                                     `pretrain.py --load DIR --finetune` and generation load
    import_cogview / export_cogview  CogView's layout <-> ours

How shards fit together is read off the model itself: a GPT built on the meta device carries
`tensor_model_parallel`, `partition_dim` and `partition_stride` on every parameter (mpu/layers.py),
so this file knows no layer by name. CogView's mp=k files split exactly like our TP=k ranks (fused
QKV per rank as [Q_r; K_r; V_r]), with the same keys.

Vocabulary rows: ModelConfig.vocab_size is padded to a multiple of 128 x TP. Writing at another TP
pads with zero rows or trims unused ones; rows at or beyond layout.vocab_size are ids that never
occur (as logits a zero row scores 0), and a used row is never dropped.

Trust: every file is read by the safe loader (megatron_t2i/safe_load.py: weights_only=True plus
DeepSpeed's few inert classes). Anything else (e.g. a CogView file that kept numpy RNG states) is
refused unless trust=True (--trust-checkpoint): full unpickling can run arbitrary code, so only
for files you trust. Our checkpoints are verified against their manifest before reading, and
the weights read must be finite, so a damaged checkpoint is never copied into a new one.
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import dataclass, replace

import torch

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.io_utils import replace_folder, write_bytes_atomic, write_text_atomic
from megatron_t2i.progress import progress_bar
from megatron_t2i.safe_load import check_state_dict, deepspeed_safe_globals, load_torch_file
from megatron_t2i.tokenizers.layout import LayoutMismatchError, TokenLayout
from megatron_t2i.training import manifest
from megatron_t2i.training.ema import EMA_KEY, module_weights
from megatron_t2i.training.checkpoint import (LATEST, TOKENIZER_FILES, CheckpointError,
                                              publish_checkpoint, read_checkpoint_info, tag_for)

WORD_EMBEDDINGS = "word_embeddings.weight"
POSITION_EMBEDDINGS = "transformer.position_embeddings.weight"
LAYER_PREFIX = "transformer.layers.{}."
COGVIEW_TRACKER = "latest_checkpointed_iteration.txt"
COGVIEW_RELEASE = "release"


def model_file(rank: int) -> str:
    """DeepSpeed's (and CogView's) weight file of tensor-parallel rank `rank`."""
    return f"mp_rank_{rank:02d}_model_states.pt"


# ----------------------------------------------------------------------------------------------
# How every parameter is split

@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]  # full (TP=1) shape
    parallel: bool          # split over TP ranks (else replicated)
    dim: int = 0            # the split dimension
    stride: int = 1         # interleaved blocks along dim (3 for the fused [Q; K; V])

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        if not self.parallel:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] //= tp
        return tuple(shape)


def parameter_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """GPT key -> ParamSpec, in the GPT's state-dict order.

    Read off a one-layer twin on the meta device: every layer has the same parameters, and
    building all layers initialises every full weight on the CPU first (minutes for 4B)."""
    from megatron_t2i.model.gpt import GPT

    twin = GPT(replace(config, num_layers=1), device="meta")
    world = mpu.get_tensor_model_parallel_world_size()  # twin shapes are this process's shards
    first_layer = LAYER_PREFIX.format(0)
    head, layer, tail = {}, {}, {}
    for key, p in twin.state_dict(keep_vars=True).items():
        parallel = bool(getattr(p, "tensor_model_parallel", False))
        dim, stride = getattr(p, "partition_dim", 0), getattr(p, "partition_stride", 1)
        shape = list(p.shape)
        if parallel:
            shape[dim] *= world
        spec = ParamSpec(tuple(shape), parallel, dim, stride)
        if key.startswith(first_layer):
            layer[key[len(first_layer):]] = spec
        else:
            (tail if layer else head)[key] = spec
    specs = dict(head)
    for i in range(config.num_layers):
        specs.update({LAYER_PREFIX.format(i) + name: spec for name, spec in layer.items()})
    specs.update(tail)
    return specs


def _check_tensor_parallel(config: ModelConfig, tp: int, where: str) -> None:
    try:
        config.check_tensor_parallel(tp)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _describe(specs: dict) -> str:
    layers = sum(1 for k in specs if k.endswith("input_layernorm.weight"))
    vocab, hidden = specs[WORD_EMBEDDINGS].shape
    return f"{layers} layers, hidden {hidden}, {vocab} vocabulary rows"


def merge_shards(shards: list[dict], specs: dict[str, ParamSpec], sources: list[str]) -> dict:
    """Per-rank state dicts (TP rank order) -> the full fp32 state dict. `sources` name the
    ranks' files in errors."""
    tp = len(shards)
    expected = {key: spec.shard_shape(tp) for key, spec in specs.items()}
    for shard, source in zip(shards, sources):
        check_state_dict(shard, expected, source, f"{_describe(specs)} at TP={tp}")
    full = {}
    for key, spec in specs.items():
        parts = [shard[key].float() for shard in shards]
        full[key] = mpu.gather_tensor_along_dim(parts, spec.dim, spec.stride) if spec.parallel \
            else parts[0]
    return full


def split_state_dict(full: dict, specs: dict[str, ParamSpec], tp: int) -> list[dict]:
    """The full state dict -> tp per-rank state dicts (shapes checked first)."""
    check_state_dict(full, {key: spec.shape for key, spec in specs.items()}, "state dict",
                     _describe(specs))
    return [{key: mpu.split_tensor_along_dim(full[key], spec.dim, tp, rank, spec.stride)
             if spec.parallel else full[key] for key, spec in specs.items()}
            for rank in range(tp)]


def resize_vocabulary(full: dict, layout: TokenLayout, rows: int, source: str) -> dict:
    """word_embeddings [V, h] -> [rows, h]: zero rows appended, or unused rows trimmed."""
    emb = full[WORD_EMBEDDINGS]
    if emb.shape[0] < layout.vocab_size or rows < layout.vocab_size:
        raise CheckpointError(f"{source}: {WORD_EMBEDDINGS} has {emb.shape[0]} rows, asked for "
                              f"{rows}; token layout {layout.name!r} uses {layout.vocab_size} ids")
    if emb.shape[0] >= rows:
        resized = emb[:rows]
    else:
        resized = torch.cat([emb, emb.new_zeros(rows - emb.shape[0], emb.shape[1])])
    return {**full, WORD_EMBEDDINGS: resized}


# ----------------------------------------------------------------------------------------------
# Reading files

def _entry(obj, key: str, path: str):
    """obj[key] of a loaded file, or one error naming the file."""
    if not isinstance(obj, dict) or obj.get(key) is None:
        raise CheckpointError(f"{path}: no {key!r} entry")
    return obj[key]


def _locate(ckpt_dir: str, tag: str | None) -> tuple[str, str]:
    """(save dir, tag) of a save folder (with `latest`) or of one checkpoint folder itself."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such folder")
    if tag is None and os.path.isfile(os.path.join(ckpt_dir, "meta.json")):
        ckpt_dir = os.path.abspath(ckpt_dir)
        return os.path.dirname(ckpt_dir), os.path.basename(ckpt_dir)
    if tag is None and not os.path.isfile(os.path.join(ckpt_dir, LATEST)):
        hint = (" (a CogView checkpoint: use import-cogview)"
                if os.path.isfile(os.path.join(ckpt_dir, COGVIEW_TRACKER)) else "")
        raise CheckpointError(f"{ckpt_dir}: not a megatron_t2i checkpoint (no '{LATEST}' file and "
                              f"no meta.json){hint}")
    return ckpt_dir, tag


def read_info(ckpt_dir: str, tag: str | None = None):
    """(checkpoint folder, ModelConfig, TokenLayout, meta) without loading weights."""
    save_dir, tag = _locate(ckpt_dir, tag)
    tag, config, layout, meta = read_checkpoint_info(save_dir, tag)
    return os.path.join(save_dir, tag), config, layout, meta


def read_verified_info(ckpt_dir: str, tag: str | None = None, files: list[str] | None = None):
    """read_info after checking `files` of the checkpoint (default: all) and its JSONs against
    its manifest (a checkpoint saved before manifests is taken as it is)."""
    folder = read_info(ckpt_dir, tag)[0]
    if files is not None:
        files = sorted(set(files) | {"model_config.json", "token_layout.json", "meta.json"})
    manifest.verify(folder, files)
    return read_info(ckpt_dir, tag)


def check_finite(state: dict, source: str) -> None:
    """Refuse weights with NaN or infinity: damage no checksum covered (e.g. an old checkpoint)."""
    for key, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {key} holds non-finite values; the checkpoint is "
                                  f"damaged")


def _parallel_sizes(meta: dict, folder: str) -> tuple[int, int]:
    try:
        return int(meta["tensor_model_parallel_size"]), int(meta["pipeline_model_parallel_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{folder}/meta.json: needs integer tensor_model_parallel_size and "
                              f"pipeline_model_parallel_size") from None


def load_full_state_dict(ckpt_dir: str, tag: str | None = None, ema: bool = True):
    """Our checkpoint (save folder with `latest`, or one iter_XXXXXXX folder) -> (full fp32 state
    dict, ModelConfig, TokenLayout, meta). meta is meta.json plus `weights_dtype`, the dtype the
    weights were stored in. ema: the moving average of the weights where the checkpoint holds one
    (what sampling uses; training/ema.py)."""
    folder, config, layout, meta = read_verified_info(ckpt_dir, tag)
    tp, pp = _parallel_sizes(meta, folder)
    _check_tensor_parallel(config, tp, f"{folder}/model_config.json")
    specs = parameter_specs(config)
    shards, sources = [], []
    for rank in progress_bar(range(tp), desc="reading tensor-parallel ranks", disable=tp == 1):
        if pp > 1:
            from megatron_t2i.model.pipeline import gpt_state_dict_from_layer_files
            try:
                shard = gpt_state_dict_from_layer_files(folder, config, rank)
                shards.append(with_stage_ema(shard, folder, config, rank, tp, pp) if ema else shard)
            except Exception as e:  # noqa: BLE001 -- a missing or unreadable layer file
                raise CheckpointError(f"{folder}: {str(e).strip().splitlines()[0]}") from None
            sources.append(f"{folder} (pipeline layer files of tensor rank {rank})")
        else:
            path = os.path.join(folder, model_file(rank))
            weights = load_torch_file(path, allow=deepspeed_safe_globals())
            shards.append(module_weights(weights, path, ema))
            sources.append(path)
        check_finite(shards[-1], sources[-1])
    full = merge_shards(shards, specs, sources)
    meta = {**meta, "weights_dtype": str(shards[0][WORD_EMBEDDINGS].dtype).replace("torch.", "")}
    return full, config, layout, meta


def with_stage_ema(state: dict, directory: str, config, tp_rank: int, tp: int, pp: int,
                   trust: bool = False) -> dict:
    """A GPT state dict of TP rank `tp_rank` read from the layer files, with the moving average of
    the weights (training/ema.py) in place of the averaged ones where the checkpoint holds one:
    each stage keeps its own, under pipeline keys, in its engine file mp_rank_{stage x TP + TP
    rank} (DeepSpeed's rank in the TP x PP model-parallel group). A folder of layer files alone
    (no engine files) has no average to read."""
    from megatron_t2i.model.pipeline import gpt_key

    state = dict(state)
    for stage in range(pp):
        path = os.path.join(directory, model_file(stage * tp + tp_rank))
        if not os.path.isfile(path):
            continue
        shadow = (load_torch_file(path, trust, deepspeed_safe_globals()).get(EMA_KEY) or {}) \
            .get("shadow") or {}
        for key, value in shadow.items():
            name = gpt_key(key, config)
            if name in state:
                state[name] = value.to(state[name].dtype)
    return state


TRUNK_PREFIXES = ("word_embeddings.", "transformer.")


def same_condition(a: ModelConfig, b: ModelConfig) -> bool:
    """Both read a condition vector of one size into as many slots (one projector shape)."""
    return bool(a.condition_slots) and (a.condition_slots, a.condition_dim) == \
        (b.condition_slots, b.condition_dim)


TRUNK_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "max_position_embeddings", "sandwich_ln", "pb_relax")


def trunk_shard(src_dir: str, config: ModelConfig, layout: TokenLayout, tp: int,
                rank: int) -> dict:
    """The shared trunk of another checkpoint (word and position embeddings, transformer layers,
    final LayerNorm; its EMA where it keeps one) as TP rank `rank` of a `config` model holds it,
    for --init-trunk: e.g. an autoregressive model's, to start a denoiser of the same size and
    vocabulary from. Where both models read a condition vector into the same slots (a clip2image
    GPT and a clip-diffusion denoiser), its projector and null embedding come too. Another
    vocabulary, layout or trunk shape is one CheckpointError line."""
    where = f"--init-trunk {src_dir}"
    try:
        full, saved, saved_layout, _ = load_full_state_dict(src_dir)
    except (CheckpointError, OSError, ValueError) as e:
        raise CheckpointError(f"--init-trunk: {str(e).strip().splitlines()[0]}") from None
    try:
        layout.check_compatible(saved_layout, where)
    except LayoutMismatchError as e:
        raise CheckpointError(str(e)) from None
    for field in TRUNK_FIELDS:
        if getattr(saved, field) != getattr(config, field):
            raise CheckpointError(f"{where}: its model {field} is {getattr(saved, field)}, this "
                                  f"run's is {getattr(config, field)}; the trunks must match")
    full = resize_vocabulary(full, layout, config.vocab_size, where)
    prefixes = TRUNK_PREFIXES + (("conditioning.",) if same_condition(saved, config) else ())
    specs = {k: s for k, s in parameter_specs(config).items() if k.startswith(prefixes)}
    return split_state_dict({k: full[k] for k in specs}, specs, tp)[rank]


# ----------------------------------------------------------------------------------------------
# ZeRO optimiser shards -> fp32 master weights

def _zero_master_weights(folder: str, tp_rank: int, dp: int, trust: bool) -> dict:
    """This TP rank's fp32 masters under GPT keys, from its `dp` ZeRO 1/2 shards.

    ZeRO 1/2 flatten each parameter group (params in the order of `param_shapes`, saved with the
    model file), each param followed by its alignment padding, the group padded at the end; rank
    d keeps the d-th equal slice. Concatenating the slices in DP order gives the flat group back."""
    model_path = os.path.join(folder, model_file(tp_rank))
    allow = deepspeed_safe_globals()
    param_shapes = _entry(load_torch_file(model_path, allow=allow), "param_shapes", model_path)
    pattern = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{tp_rank:02d}_optim_states\.pt")
    found = {}
    for path in glob.glob(os.path.join(folder, f"*_mp_rank_{tp_rank:02d}_optim_states.pt")):
        match = pattern.fullmatch(os.path.basename(path))
        if match:
            found[int(match[1])] = path
    if sorted(found) != list(range(dp)):
        missing = sorted(set(range(dp)) - set(found))
        raise CheckpointError(
            f"{folder}: ZeRO shards of tensor rank {tp_rank} for data-parallel ranks "
            f"{sorted(found)}, meta.json says data_parallel_size {dp}"
            + (f" (missing zero_pp_rank_{missing[0]}_mp_rank_{tp_rank:02d}_optim_states.pt)"
               if missing else ""))
    states = [_entry(load_torch_file(found[d], trust, allow), "optimizer_state_dict", found[d])
              for d in range(dp)]
    try:
        paddings = states[0].get("param_alignment_paddings")  # absent in older DeepSpeeds
        state = {}
        for g, shapes in enumerate(param_shapes):
            flat = torch.cat([s["single_partition_of_fp32_groups"][g].detach() for s in states])
            offset = 0
            for j, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                state[name] = flat[offset:offset + numel].view(tuple(shape)).clone()
                offset += numel + (paddings[g][j] if paddings else 0)
            group_padding = states[-1]["group_paddings"][g]  # only the last DP rank pads
            if offset + group_padding != flat.numel():
                raise CheckpointError(
                    f"{folder}: ZeRO shards of tensor rank {tp_rank} hold {flat.numel()} values in "
                    f"group {g}, its parameters need {offset} + padding {group_padding} (shards "
                    f"of different runs?)")
    except (KeyError, IndexError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: ZeRO shards of tensor rank {tp_rank} are not in the "
                              f"ZeRO 1/2 layout read here ({type(e).__name__}: {e})") from None
    return state


def merge_zero_to_fp32(ckpt_dir: str, tag: str | None = None, trust: bool = False) -> dict:
    """The fp32 master weights of a ZeRO 1/2 checkpoint as a full state dict (GPT keys, TP=1).

    DeepSpeed's own deepspeed.utils.zero_to_fp32 reads a folder of one tensor-parallel rank only
    (it globs every rank's shards together) and unpickles without weights_only; the few lines of
    its reconstruction are redone here per TP rank, then merged like load_full_state_dict."""
    folder, config, layout, meta = read_verified_info(ckpt_dir, tag)
    tp, pp = _parallel_sizes(meta, folder)
    stage = meta.get("zero_stage", 0)
    if stage not in (1, 2):
        raise CheckpointError(f"{folder}: zero_stage {stage} in meta.json; only ZeRO 1/2 shards "
                              f"hold fp32 master weights (the model files hold the weights as "
                              f"trained: use reshard)")
    if pp > 1:
        raise CheckpointError(f"{folder}: fp32 export of a pipeline-parallel ZeRO checkpoint "
                              f"(PP={pp}) is not supported; use reshard (trained weights)")
    _check_tensor_parallel(config, tp, f"{folder}/model_config.json")
    dp = int(meta.get("data_parallel_size", 1))
    shards = [_zero_master_weights(folder, r, dp, trust)
              for r in progress_bar(range(tp), desc="reading ZeRO shards", disable=tp == 1)]
    for r, shard in enumerate(shards):
        check_finite(shard, f"{folder} (ZeRO shards of tensor rank {r})")
    return merge_shards(shards, parameter_specs(config),
                        [f"{folder} (ZeRO shards of tensor rank {r})" for r in range(tp)])


# ----------------------------------------------------------------------------------------------
# Writing our layout

def save_model_checkpoint(out_dir: str, state_dict: dict, config: ModelConfig,
                          layout: TokenLayout, tp: int = 1, iteration: int = 0,
                          dtype: torch.dtype = torch.float32) -> str:
    """Write a weights-only checkpoint of the full `state_dict` at tensor-parallel size `tp`:
    {out_dir}/iter_XXXXXXX/mp_rank_XX_model_states.pt ('module' = that rank's shard in `dtype`)
    + JSONs, then `latest` (atomic: a .partial folder renamed when complete). The vocabulary is
    padded or trimmed to layout.padded_vocab_size(tp). Returns the checkpoint folder."""
    rows = layout.padded_vocab_size(tp)
    config = replace(config, vocab_size=rows)
    _check_tensor_parallel(config, tp, f"--tp {tp}")
    full = resize_vocabulary(state_dict, layout, rows, "state dict")
    shards = split_state_dict(full, parameter_specs(config), tp)
    tag = tag_for(iteration)
    partial = os.path.join(out_dir, f"{tag}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier crash
    os.makedirs(partial)
    for rank, shard in enumerate(progress_bar(shards, desc="writing tensor-parallel ranks",
                                              disable=tp == 1)):
        # copy=True: own, exact-size storage per tensor (torch.save writes a view's whole storage)
        module = {k: v.to(dtype=dtype, copy=True) for k, v in shard.items()}
        # DeepSpeed's load_module_only reads 'module' and 'dp_world_size'
        torch.save({"module": module, "dp_world_size": 1, "mp_world_size": tp,
                    "iteration": iteration}, os.path.join(partial, model_file(rank)))
    return publish_checkpoint(out_dir, tag, config, layout, {
        "iteration": iteration, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1, "data_parallel_size": 1, "zero_stage": 0,
        "weights_only": True})


def copy_tokenizers(src_dir: str, out_dir: str, tag: str | None = None) -> None:
    """The tokenizers stored beside src_dir's checkpoints ({save}/tokenizers/), beside out_dir's
    too, so a converted checkpoint generates as its source does (none kept there: nothing)."""
    folder = os.path.join(_locate(src_dir, tag)[0], "tokenizers")
    for name in TOKENIZER_FILES.values():
        source, target = os.path.join(folder, name), os.path.join(out_dir, "tokenizers", name)
        if os.path.isfile(source) and not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, "rb") as f:
                write_bytes_atomic(target, f.read())


def reshard(src_dir: str, out_dir: str, tp: int, tag: str | None = None,
            dtype: torch.dtype | None = None) -> str:
    """A checkpoint at another tensor-parallel size (dtype None: as stored)."""
    full, config, layout, meta = load_full_state_dict(src_dir, tag)
    dtype = dtype or getattr(torch, meta["weights_dtype"])
    written = save_model_checkpoint(out_dir, full, config, layout, tp, meta["iteration"], dtype)
    copy_tokenizers(src_dir, out_dir, tag)
    return written


def export_fp32(src_dir: str, out_dir: str, tp: int = 1, tag: str | None = None,
                trust: bool = False) -> str:
    """The fp32 master weights of a ZeRO 1/2 checkpoint, as an fp32 weights-only checkpoint."""
    full = merge_zero_to_fp32(src_dir, tag, trust)
    _, config, layout, meta = read_info(src_dir, tag)
    written = save_model_checkpoint(out_dir, full, config, layout, tp, meta["iteration"],
                                    torch.float32)
    copy_tokenizers(src_dir, out_dir, tag)
    return written


# ----------------------------------------------------------------------------------------------
# CogView's layout

def read_cogview_folder(src_dir: str) -> tuple[str, int, list[str]]:
    """(weights folder, iteration (0 for 'release'), per-rank files) of a CogView checkpoint."""
    tracker = os.path.join(src_dir, COGVIEW_TRACKER)
    try:
        with open(tracker) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{src_dir}: no {COGVIEW_TRACKER}, not a CogView checkpoint "
                              f"folder") from None
    if text != COGVIEW_RELEASE and not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or "
                              f"'{COGVIEW_RELEASE}', found {text!r}")
    folder = os.path.join(src_dir, text)
    ranks = sorted(int(m[1]) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if (m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name)))
    if not ranks:
        raise CheckpointError(f"{folder}: no mp_rank_XX_model_states.pt files")
    if ranks != list(range(len(ranks))):
        missing = min(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{os.path.join(folder, model_file(missing))}: missing (found ranks "
                              f"{ranks})")
    iteration = 0 if text == COGVIEW_RELEASE else int(text)
    return folder, iteration, [os.path.join(folder, model_file(r)) for r in ranks]


def cogview_config(shard: dict, mp: int, source: str,
                   num_attention_heads: int | None = None) -> ModelConfig:
    """The model config of CogView weights, from the shapes of rank 0's shard (of mp ranks).
    Heads cannot be seen in shapes: default 40 at hidden 2560 (the released models), else
    hidden / 64."""
    def shape(key):
        if key not in shard:
            raise CheckpointError(f"{source}: missing key {key}")
        return shard[key].shape

    rows, hidden = shape(WORD_EMBEDDINGS)
    layers = {int(m[1]) for k in shard if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    heads = num_attention_heads or (40 if hidden == 2560 else hidden // 64)
    if not heads or hidden % heads:
        raise CheckpointError(f"{source}: hidden size {hidden}: give --num-attention-heads "
                              f"(a divisor of {hidden}); shapes do not tell it")
    try:
        return ModelConfig(
            num_layers=max(layers, default=-1) + 1, hidden_size=hidden, num_attention_heads=heads,
            vocab_size=rows * mp, num_tokens=min(rows * mp, TokenLayout.cogview().vocab_size),
            max_position_embeddings=shape(POSITION_EMBEDDINGS)[0],
            ffn_hidden_size=shape("transformer.layers.0.mlp.dense_h_to_4h.weight")[0] * mp,
            sandwich_ln="transformer.layers.0.third_layernorm.weight" in shard)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_cogview_info(src_dir: str, num_attention_heads: int | None = None,
                      trust: bool = False) -> tuple[str, int, int, ModelConfig]:
    """(weights folder, iteration, model-parallel size, inferred ModelConfig) of a CogView
    checkpoint; reads rank 0's file only."""
    folder, iteration, paths = read_cogview_folder(src_dir)
    shard = _entry(load_torch_file(paths[0], trust), "module", paths[0])
    return folder, iteration, len(paths), cogview_config(shard, len(paths), paths[0],
                                                         num_attention_heads)


def import_cogview(src_dir: str, out_dir: str, tp: int = 1,
                   num_attention_heads: int | None = None, trust: bool = False) -> str:
    """A CogView checkpoint (any mp) -> our layout at `tp`, fp16 as stored, CogView's token
    layout. Returns the checkpoint folder."""
    folder, iteration, paths = read_cogview_folder(src_dir)
    shards = []
    for path in progress_bar(paths, desc="reading CogView ranks", disable=len(paths) == 1):
        shards.append(_entry(load_torch_file(path, trust), "module", path))
        check_finite(shards[-1], path)
    config = cogview_config(shards[0], len(paths), paths[0], num_attention_heads)
    _check_tensor_parallel(config, len(paths), folder)
    layout = TokenLayout.cogview()
    if config.vocab_size < layout.vocab_size:
        raise CheckpointError(f"{paths[0]}: {config.vocab_size} vocabulary rows in all, CogView's "
                              f"vocabulary has {layout.vocab_size} ids: another vocabulary")
    full = merge_shards(shards, parameter_specs(config), paths)
    return save_model_checkpoint(out_dir, full, config, layout, tp, iteration,
                                 shards[0][WORD_EMBEDDINGS].dtype)


def export_cogview(ckpt_dir: str, out_dir: str, mp: int = 1, tag: str | None = None) -> str:
    """Our checkpoint (CogView's token layout) -> CogView's layout at model-parallel size `mp`,
    fp16: {out_dir}/release/mp_rank_XX_model_states.pt {'module': ...} and the tracker
    'release' (CogView loads a release without optimiser or RNG states). Returns the folder."""
    full, config, layout, _ = load_full_state_dict(ckpt_dir, tag)
    cogview = TokenLayout.cogview()
    try:
        cogview.check_compatible(layout, f"{ckpt_dir} (export to CogView)")
    except LayoutMismatchError as e:
        raise CheckpointError(f"{e}; CogView's code knows only its own vocabulary") from None
    rows = cogview.padded_vocab_size(mp)  # CogView pads to a multiple of 128 x mp as well
    config = replace(config, vocab_size=rows)
    _check_tensor_parallel(config, mp, f"--mp {mp}")
    shards = split_state_dict(resize_vocabulary(full, layout, rows, ckpt_dir),
                              parameter_specs(config), mp)
    final = os.path.join(out_dir, COGVIEW_RELEASE)
    partial = f"{final}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for rank, shard in enumerate(progress_bar(shards, desc="writing CogView ranks",
                                              disable=mp == 1)):
        module = {k: v.to(dtype=torch.float16, copy=True) for k, v in shard.items()}
        torch.save({"module": module}, os.path.join(partial, model_file(rank)))
    replace_folder(partial, final)
    write_text_atomic(os.path.join(out_dir, COGVIEW_TRACKER), COGVIEW_RELEASE)
    return final
