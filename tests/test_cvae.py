"""Lformer's CVAE latent: the KL against torch.distributions, the context w entering exactly the
context slot (the same as a hand-made embedding slot), cached = uncached decoding with a latent,
and pretrain.py with --cvae-latent-dim at TP=2 killed and resumed = uninterrupted."""
import dataclasses
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from megatron_t2i.config import model_config
from megatron_t2i.data.loader import SequenceBuilder, collate
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.lshape import generate_lshape
from megatron_t2i.generation.vocab import image_vocab_mask
from megatron_t2i.model.attention import block_causal_mask
from megatron_t2i.model.gpt import GPT, Slots
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.training import convert
from test_training import BASE, metrics, resumed_equals_uninterrupted, run, weights
from toy_data import TOY_LAYOUT, write_toy_dataset

torch.set_num_threads(1)
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=5, max_text_tokens=6,
                     image_order="lshape")
CONFIG = model_config("tiny", LAYOUT, hidden_dropout=0.0, attention_dropout=0.0, latent_dim=6,
                      latent_source_dim=10, text_token_start=LAYOUT.text_offset,
                      text_token_end=LAYOUT.special_offset, context_token=LAYOUT["[BOI1]"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def test_kl_is_that_of_the_two_gaussians(model):
    source, noise = torch.randn(4, 10), torch.randn(4, 6)
    prior = torch.randn(4, 6)
    z, kl = model.cvae.posterior_sample(source, noise, prior)
    mu, log_var = model.cvae.posterior(source).chunk(2, -1)
    std = (0.5 * log_var).exp()
    reference = kl_divergence(Normal(mu, std), Normal(prior, torch.ones_like(prior))).sum(-1)
    torch.testing.assert_close(kl, reference)
    torch.testing.assert_close(z, mu + std * noise)


def test_the_latent_enters_the_context_slot_only(model):
    seqs = [LAYOUT.text_to_image([1, 2, 3], torch.randint(0, 32, (25,))),
            LAYOUT.text_to_image([4], torch.randint(0, 32, (25,)))]
    batch = collate(seqs)
    tokens, positions = batch["tokens"], batch["position_ids"]
    mask = block_causal_mask(batch["block_ids"])
    z = torch.randn(2, 6)
    keep = torch.tensor([True, False])
    with torch.no_grad():
        got = model(tokens, positions, mask, latent=z, latent_mask=keep)
        # reference: the context slot's embedding plus MLP(z), given as an embedding slot
        at = tokens == LAYOUT["[BOI1]"]
        values = model.word_embeddings(tokens) + model.cvae.context(z)[:, None, :]
        want = model(tokens, positions, mask, slots=Slots(values, at & keep[:, None]))
        plain = model(tokens, positions, mask)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[1], plain[1])  # the row without a latent is unchanged
    assert not torch.allclose(got[0], plain[0])


def test_training_inputs_carry_the_posterior_source_and_kl(model):
    builder = SequenceBuilder(LAYOUT, {"text2image": 1, "image2text": 1}, latent_dim=6)
    arrays = {"clip_image": torch.randn(10).numpy()}
    seqs = [builder([1, 2], torch.randint(0, 32, (25,)), seed, arrays=arrays) for seed in range(6)]
    batch = collate(seqs)
    is_t2i = torch.tensor([s.targets is not None for s in seqs])
    assert torch.equal(batch["latent_mask"], is_t2i) and is_t2i.any() and not is_t2i.all()
    with torch.no_grad():
        logits, kl = model(batch["tokens"], batch["position_ids"],
                           block_causal_mask(batch["block_ids"]), latent_source=batch[
                               "latent_source"], latent_noise=batch["latent_noise"],
                           latent_mask=batch["latent_mask"])
    assert (kl[~is_t2i] == 0).all() and (kl[is_t2i] > 0).all()
    with pytest.raises(ValueError, match="clip_image"):
        SequenceBuilder(LAYOUT, latent_dim=6)([1], torch.zeros(25, dtype=torch.long), 0, arrays={})


def test_decoding_with_a_latent_cached_equals_uncached(model):
    prompts = [LAYOUT.text_to_image(t) for t in ([1, 2, 3], [4, 5, 6])]
    prompt = Prompt(torch.stack([p.tokens for p in prompts]),
                    torch.stack([p.position_ids for p in prompts]), latent=torch.randn(2, 6))
    uncond = LAYOUT.text_to_image([])
    uncond = Prompt(uncond.tokens.expand(2, -1), uncond.position_ids.expand(2, -1),
                    latent=prompt.latent)
    out = [generate_lshape(model, prompt, 5, LAYOUT["[PAD]"],
                           Decoding(SamplingConfig(top_k=8), 1.5, cache), image_vocab_mask(
                               LAYOUT, CONFIG.vocab_size),
                           [torch.Generator().manual_seed(s) for s in (1, 2)], uncond)
           for cache in (True, False)]
    assert torch.equal(out[0], out[1])
    other = generate_lshape(model, dataclasses.replace(prompt, latent=torch.randn(2, 6)), 5,
                            LAYOUT["[PAD]"], Decoding(SamplingConfig(top_k=1)),
                            image_vocab_mask(LAYOUT, CONFIG.vocab_size))
    same = generate_lshape(model, prompt, 5, LAYOUT["[PAD]"], Decoding(SamplingConfig(top_k=1)),
                           image_vocab_mask(LAYOUT, CONFIG.vocab_size))
    assert not torch.equal(other, same)  # the image depends on z


@pytest.mark.slow
def test_cvae_training_at_tp2_resumes_bitwise_and_refuses_pipelines(tmp_path):
    data = write_toy_dataset(str(tmp_path / "cvae.lmdb"), count=48, clip_dim=12,
                             layout=dataclasses.replace(TOY_LAYOUT, image_order="lshape"))
    common = BASE + ["--data-path", data, "--train-iters", "8", "--save-interval", "4",
                     "--tasks", "text2image:3,image2text:1", "--text-dropout", "0.2",
                     "--cvae-latent-dim", "4", "--cvae-kl-warmup", "4", "--hidden-dropout", "0",
                     "--attention-dropout", "0"]
    flags = common + ["--tensor-model-parallel-size", "2"]
    full = resumed_equals_uninterrupted(flags, tmp_path)
    reference = metrics(full)
    assert reference[8]["train/kl"] > 0
    assert "cvae.posterior.weight" in weights(full)
    # resharded to TP=1 and back: the same shards, the CVAE replicated on both ranks
    back = convert.reshard(convert.reshard(full, str(tmp_path / "narrow"), tp=1),
                           str(tmp_path / "back"), tp=2)
    tag = open(os.path.join(full, "latest")).read().strip()
    for rank in range(2):
        name = f"mp_rank_{rank:02d}_model_states.pt"
        trained = torch.load(os.path.join(full, tag, name), weights_only=True)["module"]
        rebuilt = torch.load(os.path.join(back, name), weights_only=True)["module"]
        for key in trained:
            if key != "word_embeddings.weight":  # its padding rows are not kept
                assert torch.equal(rebuilt[key], trained[key]), (rank, key)
    one = str(tmp_path / "tp1")  # TP=1 from the same seed: the same losses
    run(common + ["--save", one], nproc=1)
    for it in range(1, 9):
        assert metrics(one)[it]["train/loss"] == pytest.approx(reference[it]["train/loss"],
                                                               abs=1e-4), it
    bad = run(BASE + ["--data-path", data, "--save", str(tmp_path / "pp"), "--train-iters", "1",
                      "--cvae-latent-dim", "4", "--pipeline-model-parallel-size", "2"], check=False)
    assert bad.returncode != 0 and "--cvae-latent-dim: the CVAE latent trains without " \
        "pipeline parallelism" in bad.stdout + bad.stderr
