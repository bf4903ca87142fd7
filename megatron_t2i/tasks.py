"""The one task registry: what each task is made of, read by arguments, layout users, the loader,
the model config, the training set-up and generate_samples.py.

    name               the one name of a task, in flags, logs and file formats
    template           the TokenLayout template its sequences follow (a method of the layout)
    attention          how its sequences attend: causal | prefix-visible | block-causal |
                       bidirectional (megatron_t2i/model/attention.py turns it into a mask)
    objective          how training scores it (megatron_t2i/training/objectives.py)
    generator          "module:function" that generate_samples.py --task NAME runs
    trainable          whether pretrain.py --tasks may train it
    needs_low_codes    its records must carry half-resolution codes (preprocess --sr-low-res)
    caption_dropout    training may drop its caption (--text-dropout, for classifier-free guidance)
    condition          the record array (a CLIP embedding) its condition slots read, if any
    latents            its image is continuous latent patches (the codebook vectors of the
                       record's codes, noised), not code ids: a denoiser's (model/diffusion.py)
    temperature        the sampling temperature its generator defaults to

Adding a task is one entry here (plus its template, strategy or objective where new). `aliases`
are the short names of earlier command lines (`--tasks t2i:3,i2t:1`), accepted by `get`.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_t2i.tokenizers.layout import TokenLayout

ATTENTION_KINDS = ("causal", "prefix-visible", "block-causal", "bidirectional")


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    generator: str
    attention: str = "causal"
    objective: str = "token-ce"
    trainable: bool = True
    needs_low_codes: bool = False
    caption_dropout: bool = False
    condition: str | None = None    # the record array its condition slots read (clip_image)
    latents: bool = False           # image as noisy latent patches (a denoiser's)
    temperature: float = 1.0        # the sampling temperature its generator defaults to
    aliases: tuple[str, ...] = ()
    summary: str = ""

    def seq_length(self, layout: TokenLayout) -> int:
        return layout.seq_length(self.template)

    def max_positions(self, layout: TokenLayout) -> int:
        return layout.max_positions(self.template)


_GEN = "megatron_t2i.generation.tasks"
REGISTRY: dict[str, Task] = {t.name: t for t in (
    Task("text2image", "text_to_image", f"{_GEN}.text2image:main_text2image",
         caption_dropout=True, aliases=("t2i",), summary="captions -> images"),
    Task("image2text", "image_to_text", f"{_GEN}.image2text:main_image2text",
         aliases=("i2t",), summary="images -> captions (also the reranker's scores)"),
    Task("super-resolution", "super_resolution", f"{_GEN}.super_resolution:main_super_resolution",
         needs_low_codes=True, temperature=1.02, aliases=("sr",),  # CogView's 1.02
         summary="an image -> twice its side"),
    Task("clip2image", "condition_to_image", f"{_GEN}.text2image:main_text2image",
         caption_dropout=True, condition="clip_image",
         summary="language-free (CLIP-GEN): trained on CLIP image embeddings of pictures alone, "
                 "prompted with the CLIP text embedding of a caption"),
    Task("diffusion", "text_to_image", f"{_GEN}.text2image:main_text2image",
         attention="bidirectional", objective="x0-mse", caption_dropout=True, latents=True,
         summary="captions -> images by denoising continuous latents (TLD): x0 prediction, "
                 "sampled with DPM-Solver++ or DDIM"),
    Task("clip-diffusion", "condition_to_image", f"{_GEN}.text2image:main_text2image",
         attention="bidirectional", objective="x0-mse", caption_dropout=True,
         condition="clip_image", latents=True,
         summary="language-free latent diffusion: a denoiser trained on CLIP image embeddings "
                 "of pictures alone, prompted with the CLIP text embedding of a caption"),
    Task("interpolation", "text_to_image", f"{_GEN}.interpolation:main_interpolation",
         trainable=False, summary="two prompts -> a strip of images between them from one "
                                  "noise (a denoiser)"),
    Task("completion", "text_to_image", f"{_GEN}.text2image:main_completion", trainable=False,
         summary="a caption and the top rows of an image -> the rest (a text2image model)"),
    Task("post-selection", "image_to_text", f"{_GEN}.post_selection:main_post_selection",
         trainable=False, summary="rank images by how well they explain a caption (an "
                                  "image2text model)"),
)}
_BY_ALIAS = {alias: task for task in REGISTRY.values() for alias in (task.name, *task.aliases)}


def get(name: str) -> Task:
    """The task of a name or alias; one line listing the known names otherwise."""
    try:
        return _BY_ALIAS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(REGISTRY)}") from None


def trainable() -> list[str]:
    return [t.name for t in REGISTRY.values() if t.trainable]


def parse_weights(text: str) -> dict[str, float]:
    """'text2image:3,image2text:1' (aliases allowed, weight 1 when omitted) -> {name: weight}."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, _, weight = item.partition(":")
        task = get(name.strip())
        if not task.trainable:
            raise ValueError(f"task {task.name!r} is not trained on its own; trainable: "
                             f"{', '.join(trainable())}")
        try:
            weights[task.name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad weight in {item!r}; expected TASK:WEIGHT") from None
    if sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ValueError(f"task weights must be >= 0 and not all 0: {text!r}")
    return weights


def max_positions(layout: TokenLayout, names=None) -> int:
    """Position-table size that serves the tasks `names` (default: every trainable one)."""
    return max(get(n).max_positions(layout) for n in (names or trainable()))
