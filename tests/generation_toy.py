"""A tiny, complete generation set-up for tests: text and image tokenizers and checkpoints of a
random tiny GPT at any tensor-parallel size, in the layout pretrain.py writes."""
from __future__ import annotations

import os
import shutil

import torch

from megatron_t2i.config import model_config
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.text import TextTokenizer, train_text_tokenizer
from megatron_t2i.tokenizers.vqvae import VQVAE, ImageTokenizer, VQVAEConfig
from megatron_t2i.training.convert import save_model_checkpoint

COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [f"a {size} {c} {s}" for size in ("small", "big") for c in COLOURS for s in SHAPES]
VQ = VQVAEConfig(hidden_channels=8, embed_dim=8, codebook_size=32, downsample=4,
                 num_res_blocks=0, image_size=32)  # 32 px -> 8x8 codes


def make_tokenizers(folder: str) -> tuple[str, str, TokenLayout]:
    """(text.model path, vqvae.pt path, matching TokenLayout)."""
    os.makedirs(folder, exist_ok=True)
    text_path = train_text_tokenizer(CAPTIONS, os.path.join(folder, "text"), vocab_size=300)
    torch.manual_seed(0)
    image_path = os.path.join(folder, "vqvae.pt")
    ImageTokenizer(VQVAE(VQ)).save(image_path)
    layout = TokenLayout(num_image_codes=VQ.codebook_size,
                         num_text_tokens=TextTokenizer(text_path).vocab_size, image_grid=8,
                         max_text_tokens=8, name="toy")
    return text_path, image_path, layout


def tiny_config(layout: TokenLayout, tp: int = 1):
    # positions of every task: the toy serves text->image, captions and super-resolution
    return model_config("tiny", layout, tp, hidden_dropout=0.0, attention_dropout=0.0)


def make_checkpoint(save_dir: str, tokenizers: tuple[str, str, TokenLayout], tp: int = 1,
                    seed: int = 0, dtype=torch.float32, state: dict | None = None,
                    config=None) -> str:
    """A weights-only checkpoint of a random tiny GPT (or of `state`; of `config`, default
    tiny_config) with its tokenizers stored beside it, as pretrain.py leaves them. Returns
    save_dir."""
    text_path, image_path, layout = tokenizers
    config = config or tiny_config(layout)
    if state is None:
        torch.manual_seed(seed)
        state = GPT(config).state_dict()
    save_model_checkpoint(save_dir, state, config, layout, tp, dtype=dtype)
    os.makedirs(os.path.join(save_dir, "tokenizers"), exist_ok=True)
    shutil.copyfile(text_path, os.path.join(save_dir, "tokenizers", "text.model"))
    shutil.copyfile(image_path, os.path.join(save_dir, "tokenizers", "vqvae.pt"))
    return save_dir
