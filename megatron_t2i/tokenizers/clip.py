"""A CLIP trained here (open_clip), on the project's own captions and images: no weights are
downloaded, and a domain of one's own gets a CLIP of its own.

The architecture is an open_clip model config (a small ViT and text transformer sized by
ClipConfig) registered with open_clip.add_model_config and built with pretrained=None. The text
tower reads the project's SentencePiece ids, so Chinese captions work: token = id + 2, 0 pads and 1
ends a caption, and the text feature is pooled at the end token (open_clip's default pools at the
largest id, right only for its own BPE, whose end token is the largest). Images are resized and
centre-cropped as the image tokenizer does, scaled to [0, 1] and normalised with `mean`/`std`.

    clip = Clip.load("data/clip.pt", text_tokenizer)
    clip.encode_texts(["a red circle"]), clip.encode_pixels(uint8 [B, 3, S, S])  # unit vectors
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace

import torch

from megatron_t2i.io_utils import dataclass_from_dict, write_torch_atomic
from megatron_t2i.safe_load import check_state_dict, load_torch_file
from megatron_t2i.tokenizers.vqvae import file_sha256

FORMAT = "megatron_t2i.clip/1"
PAD, END, OFFSET = 0, 1, 2  # text token = SentencePiece id + OFFSET


@dataclass(frozen=True)
class ClipConfig:
    text_ids: int = 1000           # SentencePiece vocabulary of the text tokenizer
    max_text_tokens: int = 40      # caption ids kept (the context holds them and the end token)
    image_size: int = 36
    patch_size: int = 12
    vision_width: int = 64
    vision_layers: int = 3
    text_width: int = 64
    text_layers: int = 3
    heads: int = 4
    embed_dim: int = 64
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for f in ("text_ids", "max_text_tokens", "image_size", "patch_size", "vision_width",
                  "vision_layers", "text_width", "text_layers", "heads", "embed_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"clip config: {f} must be a positive integer, got "
                                 f"{getattr(self, f)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"clip config: patch_size {self.patch_size} does not divide "
                             f"image_size {self.image_size}")
        if self.vision_width % self.heads or self.text_width % self.heads:
            raise ValueError(f"clip config: heads {self.heads} must divide the widths")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def context_length(self) -> int:
        return self.max_text_tokens + 1

    def open_clip_config(self) -> dict:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                               "width": self.vision_width, "layers": self.vision_layers,
                               "head_width": self.vision_width // self.heads},
                "text_cfg": {"context_length": self.context_length,
                             "vocab_size": self.text_ids + OFFSET, "width": self.text_width,
                             "heads": self.heads, "layers": self.text_layers, "pad_id": PAD,
                             "eos_id": END, "pool_type": "eos"}}

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def build_open_clip(config: ClipConfig):
    """A randomly initialised open_clip model of `config` (registered under a name of its own)."""
    import open_clip

    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    name = f"megatron-t2i-clip-{digest[:12]}"
    if name not in open_clip.list_models():
        # open_clip reads the file when it is added and keeps what it read: the folder can go
        with tempfile.TemporaryDirectory(prefix="megatron_t2i_clip_") as folder:
            path = os.path.join(folder, f"{name}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config.open_clip_config(), f)
            open_clip.add_model_config(path)
    return open_clip.create_model(name, pretrained=None)


class ClipTextTokens:
    """Captions -> LongTensor [B, context_length]: SentencePiece ids + 2, the end token, pads.
    A caption longer than max_text_tokens is cut (TextTokenizer warns, counted)."""

    def __init__(self, text_tokenizer, config: ClipConfig):
        if text_tokenizer.vocab_size != config.text_ids:
            raise ValueError(f"CLIP of {config.text_ids} text ids, the text tokenizer has "
                             f"{text_tokenizer.vocab_size}: a CLIP of another vocabulary")
        self.text, self.config = text_tokenizer, config

    def ids(self, text_ids_list) -> torch.Tensor:
        rows = torch.full((len(text_ids_list), self.config.context_length), PAD, dtype=torch.long)
        for i, ids in enumerate(text_ids_list):
            ids = list(ids)[:self.config.max_text_tokens]
            rows[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long) + OFFSET
            rows[i, len(ids)] = END
        return rows

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.ids([self.text.encode(t, self.config.max_text_tokens) for t in texts])


class Clip:
    """A trained CLIP: unit-norm image and text embeddings of the same space."""

    def __init__(self, model, config: ClipConfig, text_tokenizer, sha256: str | None = None,
                 path: str | None = None):
        self.model, self.config, self.sha256, self.path = model.eval(), config, sha256, path
        self.tokens = ClipTextTokens(text_tokenizer, config)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(config.mean).view(shape)
        self.std = torch.tensor(config.std).view(shape)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] (or floats in [0, 1]) -> the model's input."""
        x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 [B, 3, S, S] at the CLIP's image size -> float32 [B, D] unit vectors (CPU)."""
        s = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"CLIP images must be [B, 3, {s}, {s}], got {list(pixels.shape)}")
        out = [torch.zeros(0, self.config.embed_dim)]
        for i in range(0, len(pixels), batch_size):
            x = self.normalize(pixels[i:i + batch_size].to(self.device))
            out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_text_ids(self, text_ids_list, batch_size: int = 256) -> torch.Tensor:
        """SentencePiece id lists -> float32 [B, D] unit vectors (CPU)."""
        out = [torch.zeros(0, self.config.embed_dim)]
        for i in range(0, len(text_ids_list), batch_size):
            ids = self.tokens.ids(text_ids_list[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_text(ids, normalize=True).float().cpu())
        return torch.cat(out)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text_ids([self.tokens.text.encode(t, self.config.max_text_tokens)
                                     for t in texts])

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path: str, text_tokenizer_sha256: str | None = None) -> None:
        write_torch_atomic(path, {"format": FORMAT, "config": self.config.to_dict(),
                                  "text_tokenizer_sha256": text_tokenizer_sha256,
                                  "state_dict": {k: v.detach().cpu() for k, v in
                                                 self.model.state_dict().items()}})

    @classmethod
    def load(cls, path: str, text_tokenizer, device="cpu", trust: bool = False) -> "Clip":
        """A CLIP checkpoint of ours; one line if it is not one, or of another vocabulary."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
        ckpt = load_torch_file(path, trust)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"{path}: not a CLIP checkpoint of format {FORMAT}")
        config = dataclass_from_dict(ClipConfig, ckpt["config"], f"{path} config")
        want = ckpt.get("text_tokenizer_sha256")
        if want and text_tokenizer.sha256 != want:
            raise ValueError(f"{path}: trained with another text tokenizer (sha256 {want[:12]}..., "
                             f"this one {text_tokenizer.sha256[:12]}...): a CLIP of another "
                             f"vocabulary")
        try:
            tokens = ClipTextTokens(text_tokenizer, config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        model = build_open_clip(config)
        check_state_dict(ckpt["state_dict"], model.state_dict(), path)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return cls(model.to(device), config, tokens.text, file_sha256(path), path)


def config_for(text_tokenizer, image_size: int, max_text_tokens: int, **sizes) -> ClipConfig:
    """The ClipConfig of a text tokenizer and image size, other fields from `sizes`."""
    return replace(ClipConfig(text_ids=text_tokenizer.vocab_size, image_size=image_size,
                              max_text_tokens=max_text_tokens), **sizes)
