"""What generation does, as plain objects: generate_samples.py and evaluate.py fill them from
flags (megatron_t2i/arguments.py), Python callers and the web demo build them directly."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.state import Decoding


METHODS = ("auto", "autoregressive", "diffusion")


@dataclass(frozen=True)
class LoadConfig:
    """Where the model and tokenizers come from and how they are placed."""
    load: str                              # a --save folder (its `latest`) or one iter_ folder
    device: str = "auto"                   # cpu, cuda, cuda:N, or this process's GPU if any
    dtype: str | None = None               # "fp16", "bf16", or as stored (fp32 on a CPU)
    offload: bool = False                  # layers on the CPU, each moved to the GPU to run
    trust_checkpoint: bool = False         # unpickle fully (megatron_t2i/safe_load.py)
    text_tokenizer: str | None = None      # default: the ones stored with the checkpoint
    image_tokenizer: str | None = None
    clip: str | None = None                # a CLIP trained here (default: the stored one)
    ema: bool = True                       # the moving average of the weights, if saved
    checkpoint: str = "latest"             # of a --save folder: latest, or best by held-out loss
    image_tokenizer_kind: str | None = None  # vqvae | vqgan: what the image tokenizer must be


@dataclass(frozen=True)
class GenerationConfig:
    """A generation task's settings; task mains take (ctx, GenerationConfig)."""
    samples: int = 4                       # per query (--batch-size)
    max_inference_batch_size: int = 8      # rows drawn together
    sampling: SamplingConfig = SamplingConfig()
    cfg_scale: float | None = None         # None: the checkpoint's chosen scale, else 0 (guidance.py)
    seed: int = 1234
    use_cache: bool = True
    rerank_top: int = 0                    # keep the best K of `samples`, scored by:
    rerank_by: str = "auto"                # caption (likelihood), clip, or auto: clip for a
    #                                        CLIP-conditioned model, else caption
    beam_size: int = 0                     # image2text: beam search (0: sample)
    decoding_order: str = "auto"           # raster | lshape: the checkpoint's order, or auto
    method: str = "auto"                   # autoregressive | diffusion: what the checkpoint
    #                                        must be, or auto (whatever it is)
    diffusion_steps: int = 15              # a denoiser's sampler steps
    sampler: str = "dpm-solver++"          # dpm-solver++ | ddim
    keep_rows: int | None = None           # completion: rows of codes kept (default: half); of
    #                                        an L-shape model, blocks (a top-left square)
    mask_box: tuple | None = None          # completion by a denoiser: the box (x0, y0, x1, y1
    #                                        fractions) repainted, or kept with mask_outside
    mask_outside: bool = False
    top: int = 0                           # post-selection: copy the best K images
    clip_model: str | None = None          # post-selection: an open_clip score too
    clip_checkpoint: str | None = None
    input_source: str = "interactive"      # or a file of one query per line
    with_id: bool = False                  # lines are id<TAB>query
    output_path: str = "samples"
    debug: bool = False                    # one grid per query

    def __post_init__(self):
        if self.rerank_by not in ("auto", "caption", "clip"):
            raise ValueError(f"--rerank {self.rerank_by}: expected caption, clip or auto")
        if self.decoding_order not in ("auto", "raster", "lshape"):
            raise ValueError(f"--decoding {self.decoding_order}: expected auto, raster or lshape")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if self.sampler not in ("dpm-solver++", "ddim"):
            raise ValueError(f"--sampler {self.sampler}: expected dpm-solver++ or ddim")
        if self.diffusion_steps < 1:
            raise ValueError(f"--diffusion-steps {self.diffusion_steps}: must be at least 1")
        if self.rerank_top > self.samples:
            raise ValueError(f"--rerank-top {self.rerank_top} exceeds --batch-size {self.samples} "
                             f"(the samples it chooses from)")

    def decoding(self, vocab_size: int | None) -> Decoding:
        return Decoding(self.sampling, self.cfg_scale, self.use_cache, vocab_size)
