"""Model configuration and the registry of named model sizes.

A size names the transformer's shape only; the vocabulary and the number of positions come from the
token layout (the data decides them), except for sizes tied to a released model, which pin a
layout preset. Scripts say `--model-size demo` instead of repeating a dozen flags.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from megatron_t2i.io_utils import dataclass_from_dict, read_json, write_json_atomic
from megatron_t2i.tasks import max_positions
from megatron_t2i.tokenizers.layout import TokenLayout


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int                      # padded: a multiple of 128 x the largest TP size planned
    max_position_embeddings: int
    num_tokens: int = 0                  # ids in use (<= vocab_size); padding logits are masked
    ffn_hidden_size: int = 0             # 0 means 4 x hidden_size
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    sandwich_ln: bool = True             # LayerNorm after attention and MLP too (CogView)
    pb_relax: bool = True                # precision-bottleneck relaxation (CogView)
    pb_relax_alpha: float = 32.0
    layernorm_epsilon: float = 1e-5
    init_std: float = 0.02
    checkpoint_activations: bool = False
    head: str = "lm"                     # what reads the trunk's output (model/heads.py HEADS)
    # a condition vector (a CLIP embedding) projected into slots in place of a caption
    # (model/conditioning.py): its dimension, the number of slots, the placeholder id they take
    condition_dim: int = 0
    condition_slots: int = 0
    slot_token: int = -1
    # Lformer's CVAE global latent (model/cvae.py): its dimension (0: none), the dimension of the
    # record array its posterior reads (a CLIP image embedding), the caption's id range its prior
    # pools and the id of the context slot its w joins
    latent_dim: int = 0
    latent_source_dim: int = 0
    text_token_start: int = 0
    text_token_end: int = 0
    context_token: int = -1
    # a denoiser (model/diffusion.py; head "denoise"): the latent patch's channels (0: none), the
    # factor that gives the latents unit variance, the id of the placeholders the noisy patches
    # fill and of the slot that carries the noise level
    latent_channels: int = 0
    latent_scale: float = 1.0
    latent_token: int = -1
    noise_token: int = -1
    # MaskDiT (model/masked.py): layers of the decoder that reads every patch after the trunk,
    # the hidden ones as a learned mask token (0: none)
    decoder_layers: int = 0
    # TLD's depth-wise 3x3 convolution over the latent grid in every MLP (model/layer.GridConv)
    mlp_conv: bool = False
    # in/outpainting (model/diffusion.py): each patch also reads its known latent and a 0/1 mask
    inpaint_channel: bool = False
    # a model moved to another image grid (training/regrid.py): the grid side its cells' fixed
    # sin-cos positions were learnt on, read at that scale on the new grid (0: its own grid)
    grid_base: int = 0

    def __post_init__(self):
        for f in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                  "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model config: num_attention_heads {self.num_attention_heads} does not "
                             f"divide hidden_size {self.hidden_size}")
        if self.num_tokens > self.vocab_size:
            raise ValueError(f"model config: num_tokens {self.num_tokens} exceeds vocab_size "
                             f"{self.vocab_size}")
        if self.ffn_hidden_size == 0:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if bool(self.condition_slots) != bool(self.condition_dim) or \
                (self.condition_slots and not 0 <= self.slot_token < self.vocab_size):
            raise ValueError(f"model config: condition_dim {self.condition_dim}, condition_slots "
                             f"{self.condition_slots} and slot_token {self.slot_token} must be set "
                             f"together")
        if self.latent_dim and not (self.latent_source_dim > 0 and
                                    0 <= self.text_token_start < self.text_token_end
                                    and 0 <= self.context_token < self.vocab_size):
            raise ValueError(f"model config: latent_dim {self.latent_dim} needs latent_source_dim, "
                             f"the text id range and context_token (got {self.latent_source_dim}, "
                             f"{self.text_token_start}..{self.text_token_end}, "
                             f"{self.context_token})")

        if (self.head == "denoise") != bool(self.latent_channels) or (self.latent_channels and not (
                0 <= self.latent_token < self.vocab_size and 0 <= self.noise_token < self.vocab_size
                and self.latent_scale > 0)):
            raise ValueError(f"model config: a denoiser (head 'denoise') needs latent_channels, a "
                             f"positive latent_scale, latent_token and noise_token (got head "
                             f"{self.head!r}, {self.latent_channels}, {self.latent_scale}, "
                             f"{self.latent_token}, {self.noise_token})")
        if self.decoder_layers < 0 or (self.decoder_layers and not self.latent_channels):
            raise ValueError(f"model config: decoder_layers (--decoder-layers) "
                             f"{self.decoder_layers} must be >= 0, and is a denoiser's "
                             f"(masked-patch training, --tasks diffusion or clip-diffusion)")
        if self.inpaint_channel and not self.latent_channels:
            raise ValueError("model config: inpaint_channel (--inpaint-masks) is a denoiser's; "
                             "use it with --tasks diffusion or clip-diffusion")
        if self.mlp_conv and not self.latent_channels:
            raise ValueError("model config: mlp_conv (--mlp-conv) convolves a denoiser's latent "
                             "grid; use it with --tasks diffusion or clip-diffusion")
        if self.grid_base < 0:
            raise ValueError(f"model config: grid_base {self.grid_base} must be >= 0 (the grid "
                             f"side a regridded model learnt on; 0: its own)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + (4 if self.sandwich_ln else 2) * 2 * h \
            + (10 * f if self.mlp_conv else 0)
        conditioning = (self.condition_dim + 2) * self.condition_slots * h
        d = self.latent_dim
        cvae = (h * d + d + self.latent_source_dim * 2 * d + 2 * d + d * h + h + h * h + h) if d \
            else 0
        c = self.latent_channels
        denoiser = (c * h + h + 128 * h + h + h * h + h + h * c + c
                    + ((c + 1) * h + h if self.inpaint_channel else 0)) if c else 0
        decoder = self.decoder_layers * per_layer + 3 * h if self.decoder_layers else 0
        return ((self.vocab_size + self.max_position_embeddings) * h + layers * per_layer + 2 * h
                + conditioning + cvae + denoiser + decoder)

    def check_tensor_parallel(self, tp: int) -> None:
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor-parallel size {tp} does not divide num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.ffn_hidden_size % tp or self.vocab_size % tp:
            raise ValueError(f"tensor-parallel size {tp} does not divide ffn_hidden_size "
                             f"{self.ffn_hidden_size} or vocab_size {self.vocab_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
        return dataclass_from_dict(cls, d, source)

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        return cls.from_dict(read_json(path, f"model config {path}", expect=dict), source=path)


@dataclass(frozen=True)
class ModelSize:
    """A named transformer shape. cogview_norms: CogView's sandwich LayerNorm and PB-relax, which
    keep a 4B model stable in fp16; a 4-layer fp32 model learns faster without them (with
    sandwich LN every sublayer adds a unit-norm vector to the residual stream, burying the token
    embeddings, which start 50x smaller). layout_preset: the token layout a released model needs
    when none is given."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    cogview_norms: bool = True
    layout_preset: str | None = None


MODEL_SIZES = {
    "tiny": ModelSize(2, 64, 4),                                  # unit tests
    "demo": ModelSize(4, 256, 8, cogview_norms=False),            # the embedded default, on a CPU
    "cogview-tutorial": ModelSize(12, 1024, 16),                  # the original's tutorial size
    "cogview-1b": ModelSize(24, 2048, 16),                        # 1.2 B: a one-GPU benchmark
    "cogview-4b": ModelSize(48, 2560, 40, layout_preset="cogview"),  # the released CogView models
}
LAYOUT_PRESETS = {"cogview": TokenLayout.cogview}


def model_config(size: str, layout: TokenLayout | None = None, max_tensor_parallel: int = 1,
                 tasks=None, **overrides) -> ModelConfig:
    """The config of a named size for `layout` (vocabulary and positions). Sizes tied to a released
    model use their own layout preset when none is given. tasks: the names whose positions the
    table must hold (default: every trainable task of megatron_t2i/tasks.py)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)}")
    shape = MODEL_SIZES[size]
    if layout is None:
        layout = LAYOUT_PRESETS[shape.layout_preset]() if shape.layout_preset else TokenLayout()
    cfg = ModelConfig(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                      num_attention_heads=shape.num_attention_heads,
                      vocab_size=layout.padded_vocab_size(max_tensor_parallel),
                      num_tokens=layout.vocab_size,
                      max_position_embeddings=max_positions(layout, tasks),
                      sandwich_ln=shape.cogview_norms, pb_relax=shape.cogview_norms)
    return replace(cfg, **overrides) if overrides else cfg
