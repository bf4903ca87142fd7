"""The web demo: one page over the image generators of the checkpoints a process serves (gradio).

    ./scripts/web_demo.sh [--load CKPT ...]        then open http://127.0.0.1:7860

Each checkpoint is loaded once per process; requests wait in gradio's queue (at most
`queue_size`) and at most `concurrency` draw at once. A request is a prompt, a generator of the
chosen checkpoint and the sampling settings of generate_samples.py. Its samples are drawn with the
scripts' per-sample seeds (query 0 of a run with that --seed), so the first query of

    ./scripts/text2image.sh --load CKPT --seed S --batch-size N [--rerank-top N --rerank KIND] ...

draws the images the page shows, in the same order. "Compare with" sends the same prompt and
seeds through a second checkpoint, shown beside the first. Bad input is a message in the page.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

from megatron_t2i.generation.config import GenerationConfig
from megatron_t2i.generation.guidance import recorded_guidance
from megatron_t2i.generation.io import save_image
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.scoring import ranked, rerank_kind
from megatron_t2i.generation.tasks.text2image import text2image

NO_COMPARISON = "(none)"
RERANK_CHOICES = ("none", "caption", "clip")


@dataclass(frozen=True)
class DemoLimits:
    max_samples: int = 16          # per prompt and checkpoint
    max_prompt_chars: int = 500
    concurrency: int = 2           # requests drawing at once
    queue_size: int = 64           # requests waiting; more are turned away with a message


@dataclass(frozen=True)
class Request:
    """What the page asks for (the flags of generate_samples.py of the same names)."""
    prompt: str
    generator: str = "text2image"
    samples: int = 4               # --batch-size
    seed: int = 1234
    temperature: float = 1.0
    top_k: int = 200
    top_p: float = 0.0
    cfg_scale: float = 0.0
    rerank: str = "none"           # none, caption (likelihood) or clip

    def config(self, max_inference_batch_size: int) -> GenerationConfig:
        return GenerationConfig(
            samples=self.samples, max_inference_batch_size=max_inference_batch_size,
            sampling=SamplingConfig(self.temperature, self.top_k, self.top_p),
            cfg_scale=self.cfg_scale, seed=self.seed)


def generators(ctx) -> list[str]:
    """The text->image generators (task names) a checkpoint supports: a caption model draws from
    caption tokens, a CLIP-conditioned (language-free) one from the CLIP text embedding."""
    return ["clip2image"] if ctx.config.condition_slots else ["text2image"]


def decoding_note(ctx, steps: int = 15) -> str:
    """' (L-shape, 9 steps)' for a checkpoint that decodes in Lformer's blocks, ' (diffusion, 15
    steps)' for a denoiser, else ''."""
    layout = ctx.layout
    if ctx.config.latent_channels:
        return f" (diffusion, {steps} steps)"
    return f" (L-shape, {layout.image_grid} steps)" if layout.image_order == "lshape" else ""


def check(request: Request, ctx, limits: DemoLimits, name: str) -> None:
    """One line (ValueError) for a request this checkpoint cannot serve."""
    text = request.prompt.strip()
    if not text:
        raise ValueError("the prompt is empty: type a caption (English or Chinese)")
    if len(text) > limits.max_prompt_chars:
        raise ValueError(f"the prompt has {len(text)} characters; at most "
                         f"{limits.max_prompt_chars}")
    if not 1 <= request.samples <= limits.max_samples:
        raise ValueError(f"samples: {request.samples}; between 1 and {limits.max_samples}")
    if request.generator not in generators(ctx):
        raise ValueError(f"{name} has no generator {request.generator!r}; it has "
                         f"{', '.join(generators(ctx))}")
    if request.rerank not in RERANK_CHOICES:
        raise ValueError(f"rerank: {request.rerank!r}; one of {', '.join(RERANK_CHOICES)}")
    if request.rerank == "clip" and ctx.clip is None:
        raise ValueError(f"{name} has no CLIP to rerank by: rerank by caption (or train a CLIP, "
                         f"scripts/train_clip.sh, and preprocess with it)")
    if request.rerank == "caption" and (ctx.config.condition_slots or ctx.config.latent_channels):
        kind = "a denoiser" if ctx.config.latent_channels else "language-free (CLIP-conditioned)"
        raise ValueError(f"{name} is {kind} and has no caption direction to score with: rerank "
                         f"by clip")
    request.config(1)  # the sampling settings' own checks


def draw(ctx, request: Request, folder: str, max_inference_batch_size: int = 8,
         on_progress=None) -> list[tuple[str, str]]:
    """The request's samples as PNGs in `folder` -> [(path, label)], best first when reranked.
    on_progress(fraction, text) is called as each round of samples is done; with it, each round
    also runs a progress bar over its tokens (which gradio's track_tqdm shows)."""
    text = request.prompt.strip()
    config = request.config(max_inference_batch_size)

    def on_round(rows, first):
        if on_progress:
            done = first + len(rows)
            on_progress(done / config.samples, f"drew {done} of {config.samples} samples")

    codes = text2image(ctx, config, text, 0, on_round,              # [N, grid^2]
                       token_progress=on_progress is not None)
    order, scores = list(range(len(codes))), None
    if request.rerank != "none":
        order, scores = ranked(ctx, text, codes, request.rerank)
        order = order.tolist()
    images = ctx.image_tokenizer.decode_codes(codes[order])
    os.makedirs(folder, exist_ok=True)
    kind = rerank_kind(ctx, request.rerank)
    out = []
    for rank, (k, image) in enumerate(zip(order, images)):
        label = f"sample {k} of seed {request.seed}"
        if scores is not None:
            label = f"#{rank + 1}: {label}, {kind} score {scores[rank]:.3f}"
        out.append((save_image(image, os.path.join(folder, f"{rank:03d}.png")), label))
    return out


def cut_note(ctx, text: str) -> str:
    """Says when a caption model reads only the first max_text_tokens ids of the prompt."""
    if ctx.config.condition_slots:
        return ""
    ids, limit = len(ctx.text_tokenizer.encode(text)), ctx.layout.max_text_tokens
    return f" The caption was cut to its first {limit} of {ids} ids." if ids > limit else ""


def build_app(contexts: dict, limits: DemoLimits, output_dir: str,
              max_inference_batch_size: int = 8):
    """The gradio Blocks page over contexts {name: GenerationContext}, each request's PNGs in a
    folder of its own under output_dir; launch() it (with output_dir among its allowed_paths)."""
    import gradio as gr

    names = list(contexts)
    first = generators(contexts[names[0]])

    def run(prompt, name, generator, compare, samples, seed, temperature, top_k, top_p,
            cfg_scale, rerank, progress=gr.Progress(track_tqdm=True)):
        try:
            try:  # an emptied number field arrives as None
                request = Request(prompt or "", generator, int(samples), int(seed),
                                  float(temperature), int(top_k), float(top_p), float(cfg_scale),
                                  rerank)
            except (TypeError, ValueError):
                raise ValueError("samples, seed, top-k, temperature, top-p and guidance scale "
                                 "must all be numbers") from None
            if compare not in (None, NO_COMPARISON, *contexts):
                raise ValueError(f"compare with: no checkpoint {compare!r}")
            jobs = [(name, request)]
            if compare in contexts:
                other = contexts[compare]
                jobs.append((compare, request if generator in generators(other) else
                             dataclasses.replace(request, generator=generators(other)[0])))
            for job_name, job in jobs:
                check(job, contexts[job_name], limits, job_name)
            folder = tempfile.mkdtemp(dir=output_dir)
            shown = []
            for i, (job_name, job) in enumerate(jobs):
                shown.append(draw(contexts[job_name], job, os.path.join(folder, str(i)),
                                  max_inference_batch_size,
                                  lambda f, t, i=i: progress((i + f) / len(jobs), desc=t)))
        except ValueError as e:
            return [], [], [], f"**Error:** {e}"
        status = " · ".join(f"{n}: {len(s)} samples by {j.generator}"
                            f"{decoding_note(contexts[n])}, seed {j.seed}"
                            for (n, j), s in zip(jobs, shown))
        status += cut_note(contexts[name], prompt.strip())
        files = [path for s in shown for path, _ in s]
        return shown[0], shown[1] if len(shown) > 1 else [], files, status

    with gr.Blocks(title="megatron_t2i") as app:
        gr.Markdown("## megatron_t2i: text to image\nOne prompt, the checkpoints' generators, "
                    "the scripts' seeds (the same settings in `./scripts/text2image.sh` draw "
                    "the same images).")
        prompt = gr.Textbox(label="Prompt (English or Chinese)", lines=2, elem_id="prompt",
                            placeholder="a large red circle in the centre on a gray background")
        with gr.Row():
            checkpoint = gr.Dropdown(names, value=names[0], label="Checkpoint",
                                     elem_id="checkpoint")
            generator = gr.Dropdown(first, value=first[0], label="Generator", elem_id="generator")
            compare = gr.Dropdown([NO_COMPARISON] + names, value=NO_COMPARISON,
                                  label="Compare with", elem_id="compare")
        with gr.Row():
            samples = gr.Slider(1, limits.max_samples, value=4, step=1, label="Samples",
                                elem_id="samples")
            seed = gr.Number(1234, precision=0, label="Seed", elem_id="seed")
            rerank = gr.Radio(list(RERANK_CHOICES), value="none", label="Rerank by",
                              elem_id="rerank")
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature",
                                        elem_id="temperature")
                top_k = gr.Number(200, precision=0, label="Top-k (0: all)", elem_id="top-k")
                top_p = gr.Slider(0.0, 0.99, value=0.0, step=0.01, label="Top-p (0: all)",
                                  elem_id="top-p")
                chosen = recorded_guidance(contexts[names[0]].folder) or {"cfg_scale": 0.0}
                cfg_scale = gr.Slider(0.0, 10.0, value=chosen["cfg_scale"], step=0.5,
                                      label="Guidance scale (0: none; preset: the checkpoint's "
                                            "choice on held-out captions, if any)",
                                      elem_id="cfg-scale")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            gallery = gr.Gallery(label="Samples, best first when reranked", columns=4,
                                 elem_id="gallery")
            compared = gr.Gallery(label="Compared checkpoint", columns=4, elem_id="compared")
        files = gr.File(label="PNG downloads", file_count="multiple", elem_id="files")

        def pick(name):
            choices = generators(contexts[name])
            return gr.Dropdown(choices=choices, value=choices[0])

        checkpoint.change(pick, checkpoint, generator)
        button.click(run, [prompt, checkpoint, generator, compare, samples, seed, temperature,
                           top_k, top_p, cfg_scale, rerank], [gallery, compared, files, status],
                     api_name="generate", concurrency_limit=limits.concurrency)
    app.queue(max_size=limits.queue_size)
    return app
