"""The GPT as DeepSpeed pipeline stages: the same layers as gpt.py, cut into a flat list.

Pipeline layer indices (L = config.num_layers), and the GPT keys they hold:

    0        WordEmbeddingPipe      word_embeddings.*   (tied, key "word_embeddings")
    1        PositionEmbeddingPipe  transformer.position_embeddings.*   (+ embedding dropout)
    2..L+1   TransformerLayerPipe   transformer.layers.{index - 2}.*
    L+2      LayerNorm              transformer.final_layernorm.*
    L+3      the head               lm_logits with the tied word embeddings (no parameters)

A conditioned model (config.condition_slots: clip2image) has one more layer, ConditionPipe
(conditioning.*, the projected condition in place of its slot placeholders' embeddings), at index
1; every later index is one higher (FIRST_LAYER_INDEX + 1 is transformer.layers.0). A denoiser
(config.latent_channels, model/diffusion.py) has LatentPipe (latent_inputs.*: the noisy patches
and the noise level at their placeholders) next, after ConditionPipe if any, and its head is
DenoiseHead (head.*), a layer with weights of its own in place of the tied LM head. Its mask
decoder (MaskDiT) and grid convolution read every patch's place in the sequence, which does not
travel between stages: they are refused with pipeline parallelism.

Stages are cut between transformer layers only ("type:TransformerLayerPipe": the embeddings go
with the first stage, the final LayerNorm and head with the last). Layer 0 and the head are one
TiedLayerSpec: the first and the last stage each hold a copy of the word embeddings, DeepSpeed
broadcasts the first stage's copy at start and all-reduces their gradients every step.

What travels between stages (DeepSpeed sends tensors only; floating ones get gradients back):
    batch inputs (tokens [B, S], position_ids [B, S][, block_ids [B, S]])   -> layer 0
    (word embeddings [B, S, h], position_ids[, block_ids])    -> layer 1 (int ids: no gradient)
    conditioned: inputs (tokens, position_ids, condition [B, D], condition_mask [B][, block_ids]);
      layer 0 hands the tokens on to ConditionPipe, which hands on what layer 1 reads above
    denoiser: inputs (tokens, position_ids[, condition, condition_mask], noisy latents [B, N, d],
      noise level [B][, known latents [B, N, d], known mask [B, N]: with an inpainting channel],
      block_ids); the tokens travel on to LatentPipe, which hands on (embeddings, position_ids,
      block_ids)
    hidden [B, S, h] or (hidden, block_ids)                   -> layers 2..L+2
    logits [B, S, V/tp] (a denoiser: x0 [B, S, d])           -> loss_fn(logits, labels)
The data iterator yields (inputs, labels): inputs as above, labels what loss_fn reads (the
training objective's label_keys; for the default pipeline_loss, (labels, loss_mask)). Without
block ids attention is causal (CogView's training mask); with them, each layer attends by
block_causal_mask(block_ids), so every attention kind of the task registry trains pipelined.

Randomness: every layer is built from base_seed + its GPT component index (trunk.seed_component;
for all but ConditionPipe that is DeepSpeed's seed_layers rule, base_seed + pipeline index), so the
weights are GPT(seed=base_seed)'s whatever the number of stages (PP=2 starts from PP=1's weights),
nor do they depend on TP (mpu layers initialise the full weight and slice it). DeepSpeed also reseeds before every layer's forward
(base_seed * micro-batch + i), through mpu.model_parallel_seed so the TP dropout stream is reseeded
as well: dropout masks are the same for every pipeline size. (They are also the same on every
data-parallel replica: DeepSpeed's seeds do not include the DP rank.)
Activation checkpointing is done inside TransformerLayerPipe with mpu.checkpoint, not with
PipelineModule's activation_checkpoint_interval: DeepSpeed 0.19 reseeds checkpointed chunks as if
each were the stage's first layer (curr_layer = index in the chunk + stage start), which would give
every layer of a stage the same dropout masks and make them depend on the pipeline size. Do not set
"pipeline": {"activation_checkpoint_interval"} in the DeepSpeed config.

Checkpoints: DeepSpeed writes one file per pipeline layer and tensor-parallel rank,
    {dir}/{tag}/layer_XX-model_YY-model_states.pt
XX is the pipeline layer index of the table above (global, not the stage), YY the tensor-parallel
rank (data-parallel replicas are identical; the stage follows from XX). Each file holds that layer's
own state dict (e.g. layer_00: {"weight"}, layer_02: {"input_layernorm.weight", ...}); the head
has no file. `gpt_state_dict_from_layer_files` reads them back under GPT keys. Beside them,
mp_rank_ZZ_model_states.pt (engine state, "module" None) and
zero_pp_rank_D_mp_rank_ZZ_optim_states.pt are numbered by ZZ = stage * TP + TP rank (the rank in
DeepSpeed's TP x PP model-parallel group).

DeepSpeed config: pass it through `check_ds_config` (fp32 + ZeRO 0 clips pipeline gradients by a
wrong norm in DeepSpeed 0.19; use ZeRO 1 or bf16/fp16).
"""
from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
from torch import nn

from megatron_t2i import mpu
from megatron_t2i.model.attention import block_causal_mask, normal_init
from megatron_t2i.model.conditioning import ConditionProjector, slot_inputs
from megatron_t2i.model.diffusion import DenoiseHead, LatentInputs
from megatron_t2i.model.heads import language_model_loss, lm_logits
from megatron_t2i.model.layer import LayerNorm, TransformerLayer
from megatron_t2i.model.trunk import check_inputs, seed_component
from megatron_t2i.safe_load import load_torch_file

TIED_KEY = "word_embeddings"
FIRST_LAYER_INDEX = 2  # pipeline index of transformer.layers.0 (GPT component index of it)


def first_layer_index(config) -> int:
    """Pipeline index of transformer.layers.0."""
    return FIRST_LAYER_INDEX + bool(config.condition_slots) + bool(config.latent_channels)


def check_pipeline_model(config) -> None:
    """What the pipeline stages cannot hold, in one line (see the module docstring)."""
    for value, flag, what in ((config.decoder_layers, "--decoder-layers",
                               "a denoiser's mask decoder (MaskDiT)"),
                              (config.mlp_conv, "--mlp-conv", "a denoiser's grid convolution")):
        if value:
            raise ValueError(f"{flag}: {what} trains without pipeline parallelism (it reads every "
                             f"latent patch's place in the sequence, which does not travel "
                             f"between stages); use --pipeline-model-parallel-size 1 with TP or DP")


class WordEmbeddingPipe(mpu.VocabParallelEmbedding):
    """Layer 0: (tokens, position_ids, ...) -> (word embeddings [B, S, h], position_ids, ...);
    of a conditioned model or a denoiser, (embeddings, position_ids, tokens, ...) for
    ConditionPipe or LatentPipe."""

    def __init__(self, config):
        super().__init__(config.vocab_size, config.hidden_size,
                         init_method=normal_init(config.init_std))
        self.max_positions = config.max_position_embeddings
        self.num_tokens = config.num_tokens
        self.pass_tokens = bool(config.condition_slots or config.latent_channels)

    def forward(self, inputs):
        tokens, position_ids, *rest = inputs
        check_inputs(tokens, position_ids, self.max_positions, what="pipeline model")
        embeds = super().forward(tokens)
        return (embeds, position_ids, tokens, *rest) if self.pass_tokens else \
            (embeds, position_ids, *rest)


class ConditionPipe(ConditionProjector):
    """Layer 1 of a conditioned model: (embeddings, position_ids, tokens, condition,
    condition_mask, ...) -> (embeddings with the condition's slots, position_ids, ...), as
    GPT.embed(tokens, GPT.condition_slots(...)); a denoiser's keep the tokens for LatentPipe."""

    def __init__(self, config, seed: int):
        seed_component(seed, config.num_layers + 3)  # the GPT's index: the same weights
        super().__init__(config)
        self.slot_token = config.slot_token
        self.pass_tokens = bool(config.latent_channels)

    def forward(self, inputs):
        embeds, position_ids, tokens, condition, condition_mask, *rest = inputs
        values, where = slot_inputs(self, self.slot_token, tokens, condition, condition_mask)
        embeds = torch.where(where[..., None], values.to(embeds.dtype), embeds)
        return (embeds, position_ids, tokens, *rest) if self.pass_tokens else \
            (embeds, position_ids, *rest)


class LatentPipe(LatentInputs):
    """A denoiser's layer after the embeddings: (embeddings, position_ids, tokens, noisy latents,
    noise level[, known latents, known mask], block_ids) -> (embeddings with the noisy patches
    and the noise level, position_ids, block_ids), as GPT.inputs(..., noisy_latents,
    noise_level[, known_latents, known_mask])."""

    def __init__(self, config, seed: int):
        seed_component(seed, config.num_layers + 5)  # the GPT's index: the same weights
        super().__init__(config)
        self.known = 2 if config.inpaint_channel else 0

    def forward(self, inputs):
        embeds, position_ids, tokens, noisy, sigma, *rest = inputs
        known, block_ids = rest[:self.known], rest[self.known:]
        return (super().forward(tokens, embeds, noisy, sigma, *known), position_ids, *block_ids)


def lm_head(word_embeddings: WordEmbeddingPipe, hidden):
    """The last layer (TiedLayerSpec forward_fn): hidden [B, S, h] -> logits [B, S, V/tp]."""
    return lm_logits(hidden, word_embeddings.weight, num_tokens=word_embeddings.num_tokens)


class PositionEmbeddingPipe(nn.Module):
    """Layer 1: word + position embeddings, then embedding dropout -> hidden [B, S, h]."""

    def __init__(self, config, seed: int):
        seed_component(seed, 1)
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        normal_init(config.init_std)(self.position_embeddings.weight)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, inputs):
        word_embeds, position_ids, *block_ids = inputs
        hidden = self.embedding_dropout(word_embeds + self.position_embeddings(position_ids))
        return (hidden, *block_ids) if block_ids else hidden


class TransformerLayerPipe(TransformerLayer):
    """A transformer layer on hidden [B, S, h] (causal) or (hidden, block_ids); recomputed in
    backward with checkpointing."""

    def __init__(self, config, layer_number: int, seed: int):
        seed_component(seed, FIRST_LAYER_INDEX + layer_number)
        super().__init__(config, layer_number)
        self.checkpoint_activations = config.checkpoint_activations

    def forward(self, inputs):
        hidden, block_ids = inputs if isinstance(inputs, tuple) else (inputs, None)
        mask = block_causal_mask(block_ids) if block_ids is not None else None
        if self.checkpoint_activations and torch.is_grad_enabled():
            hidden = mpu.checkpoint(super().forward, hidden, mask)
        else:
            hidden = super().forward(hidden, mask)
        return (hidden, block_ids) if block_ids is not None else hidden


class FinalLayerNormPipe(LayerNorm):
    """The final LayerNorm; the block ids, if any, stop here."""

    def __init__(self, config, seed: int):
        seed_component(seed, config.num_layers + FIRST_LAYER_INDEX)
        super().__init__(config.hidden_size, config.layernorm_epsilon, config.pb_relax)

    def forward(self, inputs):
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)


def pipeline_loss(logits, labels):
    """loss_fn of the pipeline: logits [B, S, V/tp], labels = (labels [B, S], loss_mask [B, S])
    -> the loss-mask weighted mean (see language_model_loss)."""
    targets, loss_mask = labels
    return language_model_loss(logits, targets, loss_mask)[0]


def layer_specs(config, seed: int) -> list:
    """The layer list of the table in the module docstring, built from `seed`."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    check_pipeline_model(config)
    condition = [LayerSpec(ConditionPipe, config, seed)] if config.condition_slots else []
    latent = [LayerSpec(LatentPipe, config, seed)] if config.latent_channels else []
    head = LayerSpec(DenoiseHead, config) if config.latent_channels else \
        TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, config, forward_fn=lm_head)
    return ([TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, config)] + condition + latent
            + [LayerSpec(PositionEmbeddingPipe, config, seed)]
            + [LayerSpec(TransformerLayerPipe, config, i, seed) for i in range(config.num_layers)]
            + [LayerSpec(FinalLayerNormPipe, config, seed), head])


# ----------------------------------------------------------------------------------------------
# Topology and process groups

def make_topology(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    """DeepSpeed's topology over the whole world: axes pipe (outermost), data, model (innermost)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"pipeline model: world size {world} is not divisible by "
                         f"tensor-parallel {tp} x pipeline-parallel {pp}")
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))


def initialize_model_parallel_from_topology(topology) -> None:
    """Make mpu's TP/PP/DP groups those of `topology` (or check that they already are)."""
    if list(topology.get_axis_names()) != ["pipe", "data", "model"]:
        raise ValueError(f"pipeline model: topology axes must be ['pipe', 'data', 'model'] "
                         f"(mpu's order), got {topology.get_axis_names()}")
    tp, pp = topology.get_dim("model"), topology.get_dim("pipe")
    world = dist.get_world_size()
    if topology.world_size() != world:
        raise ValueError(f"pipeline model: topology of {topology.world_size()} ranks for a world "
                         f"of {world}")
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tp, pp)
    sizes = (mpu.get_tensor_model_parallel_world_size(),
             mpu.get_pipeline_model_parallel_world_size())
    if sizes != (tp, pp):
        raise ValueError(f"pipeline model: mpu is initialised with TP={sizes[0]} PP={sizes[1]}, "
                         f"the topology has TP={tp} PP={pp}")
    ours = mpu.parallel_group_ranks(world, tp, pp)
    for kind, axis in (("tp", "model"), ("pp", "pipe"), ("dp", "data")):
        theirs = topology.get_axis_comm_lists(axis) or [[r] for r in range(world)]
        assert sorted(ours[kind]) == sorted(theirs), (kind, ours[kind], theirs)


def seed_layer(seed) -> None:
    """seed_fn of the PipelineModule: reseed the default and TP streams before building or running
    a layer (DeepSpeed passes numpy integers from its partition arithmetic)."""
    mpu.model_parallel_seed(int(seed))


def build_pipeline_model(config, topology=None, *, tensor_model_parallel_size: int = 1,
                         pipeline_model_parallel_size: int = 1, loss_fn=pipeline_loss,
                         partition_method: str = "type:TransformerLayerPipe",
                         base_seed: int = 1234):
    """The GPT as a deepspeed.pipe.PipelineModule holding this rank's stage.

    Give a topology (axes pipe, data, model) or the TP/PP sizes (DP = the rest of the world).
    torch.distributed must be initialised; mpu is initialised from the topology if it is not yet.
    Pass the result to deepspeed.initialize(model=...), which returns a PipelineEngine.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("pipeline model: torch.distributed must be initialised first "
                           "(deepspeed.init_distributed or torch.distributed.init_process_group)")
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group
    if topology is None:
        topology = make_topology(tensor_model_parallel_size, pipeline_model_parallel_size)
    initialize_model_parallel_from_topology(topology)
    config.check_tensor_parallel(topology.get_dim("model"))
    with torch.no_grad():  # DeepSpeed broadcasts the tied weights in place: not an autograd op
        return PipelineModule(layer_specs(config, base_seed), topology=topology, loss_fn=loss_fn,
                              seed_layers=True, seed_fn=seed_layer, base_seed=base_seed,
                              partition_method=partition_method,
                              activation_checkpoint_interval=0)


def check_ds_config(ds_config: dict, pipeline_model_parallel_size: int) -> None:
    """Refuse a DeepSpeed config that trains a pipeline wrongly. In fp32 with ZeRO stage 0,
    DeepSpeed 0.19 clips gradients by a norm that counts, on every stage but the first, only the
    tensor-parallel parameters (LayerNorms and replicated biases are left out, the tied embeddings
    counted twice): the update is silently mis-scaled. ZeRO 1, bf16 and fp16 count correctly.
    Also refuse DeepSpeed's own activation checkpointing (see the module docstring)."""
    if ds_config.get("pipeline", {}).get("activation_checkpoint_interval", 0):
        raise ValueError("DeepSpeed config: remove pipeline.activation_checkpoint_interval; "
                         "activation checkpointing follows the model config "
                         "(checkpoint_activations), per transformer layer")
    if pipeline_model_parallel_size < 2:
        return
    mixed = any(ds_config.get(k, {}).get("enabled") for k in ("fp16", "bf16"))
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    clipping = ds_config.get("gradient_clipping", 1.0)  # DeepSpeed 0.19 clips at 1.0 by default
    if not mixed and zero_stage == 0 and clipping > 0:
        raise ValueError(f"DeepSpeed config: pipeline parallelism ({pipeline_model_parallel_size} "
                         f"stages) in fp32 with ZeRO stage 0 clips gradients by a wrong norm "
                         f"(gradient_clipping {clipping}); use ZeRO stage 1, bf16/fp16, or "
                         f"gradient_clipping 0")


# ----------------------------------------------------------------------------------------------
# GPT keys <-> pipeline keys

def layer_prefixes(config) -> list[str | None]:
    """GPT key prefix of every pipeline layer index (None: the tied LM head, no parameters)."""
    return (["word_embeddings."] + ["conditioning."] * bool(config.condition_slots)
            + ["latent_inputs."] * bool(config.latent_channels)
            + ["transformer."] + [f"transformer.layers.{i}." for i in range(config.num_layers)]
            + ["transformer.final_layernorm.", "head." if config.latent_channels else None])


def gpt_key(pipeline_key: str, config) -> str:
    """PipelineModule state-dict key -> GPT key: 'tied_modules.word_embeddings.weight' ->
    'word_embeddings.weight', '3.mlp.dense_h_to_4h.bias' -> 'transformer.layers.1.mlp...'."""
    head, _, rest = pipeline_key.partition(".")
    prefixes = layer_prefixes(config)
    if head == "tied_modules" and rest.startswith(TIED_KEY + "."):
        return prefixes[0] + rest[len(TIED_KEY) + 1:]
    if head.isdigit() and 0 < int(head) < len(prefixes) and prefixes[int(head)]:
        return prefixes[int(head)] + rest  # 0 and the LM head: tied_modules
    raise ValueError(f"pipeline model: no GPT key for pipeline key {pipeline_key!r} "
                     f"({config.num_layers} layers)")


_GPT_LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def pipeline_key(gpt_key_: str, config) -> str:
    """GPT key -> PipelineModule state-dict key (the inverse of gpt_key)."""
    layer = _GPT_LAYER_KEY.fullmatch(gpt_key_)
    first = first_layer_index(config)
    if layer and int(layer[1]) < config.num_layers:
        return f"{int(layer[1]) + first}.{layer[2]}"
    conditioning = [("conditioning.", "1.")] if config.condition_slots else []
    latent = [("latent_inputs.", f"{first - 2}."),
              ("head.", f"{config.num_layers + first + 1}.")] if config.latent_channels else []
    for prefix, pipe_prefix in [("word_embeddings.", f"tied_modules.{TIED_KEY}."),
                                ("transformer.position_embeddings.",
                                 f"{first - 1}.position_embeddings."),
                                ("transformer.final_layernorm.", f"{config.num_layers + first}.")
                                ] + conditioning + latent:
        if gpt_key_.startswith(prefix):
            return pipe_prefix + gpt_key_[len(prefix):]
    raise ValueError(f"pipeline model: GPT key {gpt_key_!r} has no pipeline layer "
                     f"({config.num_layers} layers)")


def gpt_state_dict(module, config) -> dict[str, torch.Tensor]:
    """This stage's weights under GPT keys (this rank's TP shards, as a TP-sharded GPT holds)."""
    return {gpt_key(k, config): v for k, v in module.state_dict().items()}


@torch.no_grad()
def load_gpt_state_dict(module, state_dict: dict[str, torch.Tensor], config) -> None:
    """Copy the weights this stage holds from a GPT state dict (same TP rank's shards)."""
    own = module.state_dict()
    missing = [gpt_key(k, config) for k in own if gpt_key(k, config) not in state_dict]
    if missing:
        raise ValueError(f"pipeline model: GPT state dict lacks {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    for key, tensor in own.items():
        source = state_dict[gpt_key(key, config)]
        if source.shape != tensor.shape:
            raise ValueError(f"pipeline model: {gpt_key(key, config)} has shape "
                             f"{list(source.shape)}, this stage expects {list(tensor.shape)}")
        tensor.copy_(source)


def gpt_state_dict_from_layer_files(directory: str, config, tp_rank: int = 0,
                                    trust: bool = False) -> dict:
    """Read DeepSpeed's per-layer pipeline files of one TP rank -> GPT state dict (CPU tensors)."""
    state = {}
    for index, prefix in enumerate(layer_prefixes(config)):
        if prefix is None:
            continue
        path = os.path.join(directory, f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pipeline checkpoint: {path} missing (pipeline layer {index} "
                                    f"of {len(layer_prefixes(config))}, tensor-parallel rank {tp_rank})")
        layer = load_torch_file(path, trust)
        state.update({prefix + k: v for k, v in layer.items()})
    return state

