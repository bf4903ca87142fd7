"""Sampling a denoiser (model/diffusion.py) with diffusers' schedulers, used standalone.

The model was trained on x_t = (1 - sigma) x0 + sigma e and predicts x0. Two samplers:

    dpm-solver++  DPMSolverMultistepScheduler with flow sigmas: its states are x_t of exactly
                  that path, so the model reads them as they are; x0 is handed over as the flow
                  velocity (x_t - x0) / sigma, from which the solver recovers x0 exactly.
    ddim          DDIMScheduler (variance preserving down to zero SNR, prediction_type
                  "sample"): its state
                  sqrt(a) x0 + sqrt(1 - a) e is the flow state times sqrt(a) + sqrt(1 - a), at
                  sigma = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)); the model reads it divided so.

Both end at sigma = 0, where a model that always returns the true x0 gives back x0 exactly (the
samplers' test). In/outpainting (`known`): the given patches' x0 is their known latent at every
step, so the path ends on them exactly (any denoiser; one with an inpainting channel also reads
them beside its noisy input, model/diffusion.py). Guidance: x0 = x0_c + s (x0_c - x0_u), the
same convention as the autoregressive models' logits (s = 0: the conditional model; TLD's
class_guidance w is s + 1). The starting noise of each sample comes from its own generator, and every row is denoised on its
own (bidirectional attention inside a row only), so a sample does not depend on its batch.
"""
from __future__ import annotations

import torch

from megatron_t2i.model.attention import block_causal_mask
from megatron_t2i.progress import progress_bar
from megatron_t2i.tokenizers.layout import block_ids, real_length

SAMPLERS = ("dpm-solver++", "ddim")


def sequence_inputs(layout, seq) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A denoiser's Sequence (layout.text_to_latents) -> (tokens [S], positions [S], mask [1, 1, S,
    S]) as training feeds it: all but the last token, bidirectional over the real ones."""
    ids = block_ids("bidirectional", seq.tokens.numel(),
                    real=real_length(seq.tokens, layout["[PAD]"]))
    return seq.tokens[:-1], seq.position_ids[:-1], block_causal_mask(ids[:-1])


class FlowDPMSolver:
    """DPM-Solver++ (2M) on the flow path; `sigma(i)` the noise level of step i's state."""

    def __init__(self, steps: int):
        from diffusers import DPMSolverMultistepScheduler
        self.scheduler = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
            prediction_type="flow_prediction", final_sigmas_type="zero")
        self.scheduler.set_timesteps(steps)

    def start(self, noise):
        return noise

    def model_input(self, i: int, x):
        return x, float(self.scheduler.sigmas[i])

    def step(self, i: int, x, x0):
        sigma = float(self.scheduler.sigmas[i])
        velocity = (x - x0) / sigma
        return self.scheduler.step(velocity, self.scheduler.timesteps[i], x).prev_sample

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


class VPDDIM:
    """DDIM (eta 0) in its own variance-preserving space, its states rescaled for the model."""

    def __init__(self, steps: int):
        from diffusers import DDIMScheduler
        # zero terminal SNR: the first state is pure noise, as the flow path's sigma = 1. A
        # schedule of a multiple of `steps` timesteps: DDIM steps from t to t - T // steps, which
        # is the next timestep only when `steps` divides T (else the states drift off the
        # alphas the model is told)
        self.scheduler = DDIMScheduler(num_train_timesteps=steps * -(-1000 // steps),
                                       prediction_type="sample", clip_sample=False,
                                       set_alpha_to_one=True, timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True)
        self.scheduler.set_timesteps(steps)

    def _scales(self, i: int) -> tuple[float, float]:
        a = float(self.scheduler.alphas_cumprod[self.scheduler.timesteps[i]])
        total = a ** 0.5 + (1 - a) ** 0.5
        return total, (1 - a) ** 0.5 / total

    def start(self, noise):
        return noise * self.scheduler.init_noise_sigma

    def model_input(self, i: int, x):
        total, sigma = self._scales(i)
        return x / total, sigma

    def step(self, i: int, x, x0):
        return self.scheduler.step(x0, self.scheduler.timesteps[i], x, eta=0.0).prev_sample

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


def make_sampler(name: str, steps: int):
    if steps < 1:
        raise ValueError(f"--diffusion-steps {steps}: must be at least 1")
    if name == "dpm-solver++":
        return FlowDPMSolver(steps)
    if name == "ddim":
        return VPDDIM(steps)
    raise ValueError(f"--sampler {name}: expected one of {', '.join(SAMPLERS)}")


def predict_x0(model, tokens, positions, mask, x, sigma: float, **inputs):
    """The denoiser's x0 [B, N, d] of states x [B, N, d] at noise level sigma (inputs: a
    language-free denoiser's condition and condition_mask)."""
    out = model(tokens, positions, mask, noisy_latents=x,
                noise_level=x.new_full((len(x),), sigma), **inputs)
    where = tokens == model.config.latent_token
    return out[where].view(x.shape).float()


@torch.no_grad()
def denoise(model, cond, uncond, sampler, noise, cfg_scale: float = 0.0, progress=False,
            denoiser=predict_x0):
    """noise [B, N, d] (scaled latent space) -> x0 [B, N, d] after the sampler's steps.
    cond/uncond: (tokens, positions, mask[, inputs]) of the prompt and, for guidance
    (cfg_scale != 0), of the unconditional prompt, each [B, S] ([1, 1, S, S] mask; inputs: a
    dict of [B, ...] model keywords, a CLIP condition). denoiser(model, tokens, positions, mask,
    x, sigma, **inputs): predict_x0, or a stand-in (tests give the true x0)."""
    guided = bool(cfg_scale) and uncond is not None
    rows = len(noise)
    cond = (*cond, {}) if len(cond) == 3 else cond
    if guided:  # one forward for both branches
        uncond = (*uncond, {}) if len(uncond) == 3 else uncond
        tokens = torch.cat([cond[0], uncond[0]])
        positions = torch.cat([cond[1], uncond[1]])
        mask = torch.cat([cond[2].expand(rows, -1, -1, -1), uncond[2].expand(rows, -1, -1, -1)])
        inputs = {k: torch.cat([v, uncond[3][k]]) for k, v in cond[3].items()}
    else:
        tokens, positions, mask, inputs = cond
    x = sampler.start(noise.float())
    desc = progress if isinstance(progress, str) else None
    for i in progress_bar(range(sampler.steps), desc=desc, unit="step", disable=not progress,
                          leave=False):
        state, sigma = sampler.model_input(i, x)
        if guided:
            both = denoiser(model, tokens, positions, mask, torch.cat([state, state]), sigma,
                            **inputs)
            c, u = both[:rows], both[rows:]
            x0 = c + cfg_scale * (c - u)
        else:
            x0 = denoiser(model, tokens, positions, mask, state, sigma, **inputs)
        x = sampler.step(i, x, x0)
    return x


def keeping(given: torch.Tensor, known: torch.Tensor, denoiser=predict_x0):
    """A denoiser (for `denoise`) whose x0 at the known patches (known [N] bool) is `given`
    [N, d], the latents kept: each step moves them towards their values, the last lands on them."""
    def predict(model, tokens, positions, mask, x, sigma, **inputs):
        x0 = denoiser(model, tokens, positions, mask, x, sigma, **inputs)
        return torch.where(known[None, :, None], given.to(x0), x0)
    return predict


def sample_latent_codes(ctx, config, prompt, uncond, generators, progress=False,
                        known=None) -> torch.Tensor:
    """A denoiser's images for `prompt` (layout.text_to_latents, or condition_to_latents with
    its condition) as image codes [B, grid^2]: one noise draw per generator,
    `config.diffusion_steps` of `config.sampler`, guidance config.cfg_scale, the final latents
    snapped to the nearest codebook vector. known: (codes [grid^2], mask [grid^2] bool) of
    in/outpainting, the codes kept where mask."""
    layout, model, device = ctx.layout, ctx.model, ctx.device
    rows, n, d = len(generators), layout.image_tokens, model.config.latent_channels
    noise = torch.stack([torch.randn(n, d, generator=g, device=device) for g in generators])
    sampler = make_sampler(config.sampler, config.diffusion_steps)
    denoiser, extra = predict_x0, {}
    if known is not None:
        codes, mask = (t.to(device) for t in known)
        given = codes_to_latents(ctx, codes)                                     # [N, d]
        denoiser = keeping(given, mask)
        if model.config.inpaint_channel:
            extra = {"known_latents": given.expand(rows, -1, -1),
                     "known_mask": mask.expand(rows, -1)}
    x0 = denoise(model, branch(layout, prompt, rows, device, extra=extra),
                 branch(layout, uncond, rows, device, extra=extra) if uncond is not None
                 else None, sampler, noise, config.cfg_scale, progress, denoiser)
    out = latents_to_codes(ctx, x0)
    return out if known is None else torch.where(mask, codes, out)


def branch(layout, seq, rows: int, device, inputs: dict | None = None,
           extra: dict | None = None) -> tuple:
    """A denoiser's Sequence as `denoise` reads a branch, repeated for `rows` samples: (tokens,
    positions [rows, S], mask, inputs). inputs: [rows, ...] model keywords; by default a
    language-free prompt's condition (the CLIP text embedding, or the null one), else none;
    extra: more of them (the known patches of in/outpainting)."""
    tokens, positions, mask = sequence_inputs(layout, seq)
    if inputs is None:
        inputs = {} if seq.condition is None else {
            "condition": seq.condition.to(device, torch.float32).expand(rows, -1),
            "condition_mask": torch.full((rows,), seq.condition_present, device=device)}
    return (tokens.to(device).expand(rows, -1), positions.to(device).expand(rows, -1),
            mask.to(device), {**inputs, **(extra or {})})


def codes_to_latents(ctx, codes) -> torch.Tensor:
    """Image codes [...] -> their latents [..., d] (codebook vectors times latent_scale: the
    space the denoiser works in), on ctx.device; latents_to_codes' inverse on codebook vectors."""
    embed = ctx.image_tokenizer.model.quantize_t.embed                       # [d, K]
    return embed.t()[codes.to(embed.device)].to(ctx.device, torch.float32) \
        * ctx.model.config.latent_scale


def latents_to_codes(ctx, x0) -> torch.Tensor:
    """Final latents x0 [B, N, d] (scaled) -> the nearest codebook entries [B, N], on ctx.device:
    the VQ-VAE's own search, so the codes decode like any."""
    rows, n, d = x0.shape
    latents = (x0 / ctx.model.config.latent_scale).reshape(-1, d)           # [B N, d]
    quantize = ctx.image_tokenizer.model.quantize_t
    return quantize.nearest(latents.to(quantize.embed.device)).view(rows, n).to(ctx.device)
