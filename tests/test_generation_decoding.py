"""Decoding: KV-cached equals full recomputation (tokens and logits), both equal a teacher-forced
forward of the finished sequence, CFG, allowed-vocabulary switching, per-sample seeds across batch
compositions, custom positions, and sequence scoring."""
import pytest
import torch

from megatron_t2i.config import model_config
from megatron_t2i.generation.sampling import SamplingConfig, classifier_free_guidance
from megatron_t2i.generation.scoring import score
from megatron_t2i.generation.state import Decoding, DecodingState, Prompt
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.vocab import image_vocab_mask, text_vocab_mask
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.layout import TokenLayout

torch.set_num_threads(1)
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=8, max_text_tokens=6)
CONFIG = model_config("tiny", LAYOUT, hidden_dropout=0.0, attention_dropout=0.0)
SAMPLING = SamplingConfig(temperature=1.2, top_k=20, top_p=0.95)
N = 20  # tokens generated per test (a third of an image: enough to cross many steps)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def prompts(texts):
    """Same-length t2i prompts [B, P] and positions."""
    seqs = [LAYOUT.text_to_image(t) for t in texts]
    return torch.stack([s.tokens for s in seqs]), torch.stack([s.position_ids for s in seqs])


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


TEXTS = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
IMAGE = image_vocab_mask(LAYOUT, CONFIG.vocab_size)


@torch.no_grad()
def teacher_forced(model, prompt, positions, tokens):
    """Reference: one plain forward over prompt + generated tokens -> logits that predicted each
    generated token [B, N, V]."""
    p = prompt.shape[1]
    full = torch.cat([prompt, tokens], 1)
    pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, tokens.shape[1] + 1)], 1)
    return model(full, pos)[:, p - 1:-1].float()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_cached_equals_uncached_equals_teacher_forcing(model, cfg_scale):
    prompt, pos = prompts(TEXTS)
    uncond = LAYOUT.text_to_image([])
    u_prompt, u_pos = uncond.tokens.expand(3, -1), uncond.position_ids.expand(3, -1)
    runs = {}
    for cache in (True, False):
        runs[cache] = generate(model, Prompt(prompt, pos), N, Decoding(SAMPLING, cfg_scale, cache),
                               IMAGE, gens([1, 2, 3]), Prompt(u_prompt, u_pos), return_logits=True)
    (tokens, logits), (tokens_ref, logits_ref) = runs[True], runs[False]
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)

    expected = teacher_forced(model, prompt, pos, tokens)
    if cfg_scale:
        expected = classifier_free_guidance(expected, teacher_forced(model, u_prompt, u_pos, tokens),
                                            cfg_scale)
    expected = expected.masked_fill(~IMAGE, float("-inf"))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert bool((tokens < LAYOUT.num_image_codes).all())


def test_cached_path_feeds_one_token_per_step(model):
    prompt, pos = prompts(TEXTS[:1])
    widths = []
    hook = model.transformer.layers[0].register_forward_pre_hook(
        lambda mod, args: widths.append(args[0].shape[1]))
    try:
        generate(model, Prompt(prompt, pos), 5, Decoding(SAMPLING), IMAGE, gens([0]))
    finally:
        hook.remove()
    assert widths == [prompt.shape[1], 1, 1, 1, 1]  # the prompt once, never the prefix again


def test_per_sample_seeds_survive_any_batch_composition(model):
    prompt, pos = prompts(TEXTS)
    seeds = [10, 20, 30]
    together = generate(model, Prompt(prompt, pos), N, Decoding(SAMPLING), IMAGE, gens(seeds))
    for i in range(3):  # each sample alone
        alone = generate(model, Prompt(prompt[i:i + 1], pos[i:i + 1]), N, Decoding(SAMPLING), IMAGE,
                         gens([seeds[i]]))
        assert torch.equal(alone[0], together[i])
    order = [2, 0]  # a different batch of a different size
    pair = generate(model, Prompt(prompt[order], pos[order]), N, Decoding(SAMPLING), IMAGE,
                    gens([seeds[i] for i in order]))
    assert torch.equal(pair, together[order])
    other = generate(model, Prompt(prompt, pos), N, Decoding(SAMPLING), IMAGE, gens([11, 21, 31]))
    assert not torch.equal(other, together)


def test_allowed_vocabulary_switches_during_generation(model):
    # an image of 6 codes, then [EOI1], then text: what image2text-style decoding needs
    prompt, pos = prompts(TEXTS[:2])
    eoi = LAYOUT["[EOI1]"]
    only_eoi = torch.zeros(CONFIG.vocab_size, dtype=torch.bool)
    only_eoi[eoi] = True
    text = text_vocab_mask(LAYOUT, CONFIG.vocab_size)

    def allowed(step):
        return IMAGE if step < 6 else only_eoi if step == 6 else text

    tokens = generate(model, Prompt(prompt, pos), 14, Decoding(), allowed, gens([3, 4]))
    assert bool((tokens[:, :6] < LAYOUT.num_image_codes).all())
    assert bool((tokens[:, 6] == eoi).all())
    assert bool(LAYOUT.is_text(tokens[:, 7:]).all())
    extra = text_vocab_mask(LAYOUT, CONFIG.vocab_size, extra=(LAYOUT["[PAD]"],))
    assert extra.sum() == text.sum() + 1 and extra[LAYOUT["[PAD]"]]


def test_custom_positions_of_new_tokens(model):
    # e.g. super-resolution restarts positions: tokens placed at 40, 41, ... instead of P, P+1, ...
    prompt, pos = prompts(TEXTS[:1])
    start = 40
    a, logits = generate(model, Prompt(prompt, pos), 6, Decoding(SAMPLING), IMAGE, gens([5]),
                         return_logits=True, next_positions=lambda step: start + step)
    b = generate(model, Prompt(prompt, pos), 6, Decoding(SAMPLING, use_cache=False), IMAGE,
                 gens([5]), next_positions=torch.arange(start, start + 6))
    assert torch.equal(a, b)
    full = torch.cat([prompt, a], 1)
    full_pos = torch.cat([pos, torch.arange(start, start + 6)[None]], 1)
    expected = model(full, full_pos)[:, prompt.shape[1] - 1:-1].masked_fill(~IMAGE, float("-inf"))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_too_long_generation_is_one_clear_error(model):
    prompt, pos = prompts(TEXTS[:1])
    with pytest.raises(ValueError, match="outside the model's .* positions"):
        generate(model, Prompt(prompt, pos), CONFIG.max_position_embeddings, Decoding(SAMPLING))
    with pytest.raises(ValueError, match="cfg_scale needs the unconditional prompt"):
        generate(model, Prompt(prompt, pos), 2, Decoding(SAMPLING, cfg_scale=2.0))


@torch.no_grad()
def test_score_is_the_masked_log_likelihood(model):
    seq = LAYOUT.image_to_text(torch.arange(64) % 32, [3, 1, 4, 1, 5], pad=False)
    tokens = torch.stack([seq.tokens, seq.tokens.flip(0)])
    positions = seq.position_ids.expand(2, -1)
    target = LAYOUT.is_text(tokens).float()  # score the caption tokens only
    text = text_vocab_mask(LAYOUT, CONFIG.vocab_size)
    for allowed in (None, text):
        logits = model(tokens, positions)[:, :-1].float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        got = score(model, tokens, positions, target, allowed)
        torch.testing.assert_close(got, torch.where(target[:, 1:].bool(), logp, 0).sum(1))
        assert bool(torch.isfinite(got).all())
    # renormalised over text ids only, a caption is likelier than among all ids
    assert score(model, tokens, positions, target, text)[0] > score(model, tokens, positions, target)[0]


@torch.no_grad()
def test_vocabulary_padding_changes_nothing(model):
    # the same weights with the vocabulary padded to more rows (as at a larger TP size)
    from dataclasses import replace
    wide = GPT(replace(CONFIG, vocab_size=2 * CONFIG.vocab_size)).eval()
    state = dict(model.state_dict())
    emb = state["word_embeddings.weight"]
    state["word_embeddings.weight"] = torch.cat([emb, torch.zeros_like(emb)])
    wide.load_state_dict(state)
    prompt, pos = prompts(TEXTS)
    runs = [generate(m, Prompt(prompt, pos), N, Decoding(SAMPLING, vocab_size=LAYOUT.vocab_size),
                     None, gens([1, 2, 3])) for m in (model, wide)]
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < LAYOUT.vocab_size  # never a padding row, even with no mask
    seq = torch.cat([prompt, runs[0]], 1)
    positions = torch.arange(seq.shape[1]).expand(3, -1)
    target = torch.ones_like(seq, dtype=torch.float)
    scores = [score(m, seq, positions, target, vocab_size=LAYOUT.vocab_size) for m in (model, wide)]
    torch.testing.assert_close(scores[0], scores[1])


@torch.no_grad()
def test_a_block_read_in_one_step_equals_recomputation_and_the_block_mask(model):
    prompt, pos = prompts(TEXTS[:2])
    p = prompt.shape[1]
    block = torch.randint(0, LAYOUT.num_image_codes, (2, 3))
    logits = {}
    for cache in (True, False):
        state = DecodingState(model, Prompt(prompt, pos), 6, use_cache=cache)
        state.logits()
        state.append(block, pos[:, -1:] + torch.arange(1, 4), block=True)  # one block of 3
        logits[cache] = state.logits(last=3)                                # [2, 3, V]
        state.append(block[:, 0], pos[:, -1] + 4)                           # then causal again
        logits[cache, "after"] = state.logits()
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[True, "after"], logits[False, "after"], atol=1e-5, rtol=1e-5)
    # the reference: one forward with the block-causal mask of the whole sequence
    from megatron_t2i.model import block_causal_mask
    ids = torch.cat([torch.arange(p), torch.full((3,), p), torch.tensor([p + 1])])
    tokens = torch.cat([prompt, block, block[:, :1]], 1)
    positions = torch.cat([pos, pos[:, -1:] + torch.arange(1, 5)], 1)
    full = model(tokens, positions, attention_mask=block_causal_mask(ids)).float()
    torch.testing.assert_close(logits[True], full[:, p:p + 3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[True][:, 0], model(tokens[:, :p + 1], positions[:, :p + 1])
                              [:, -1].float(), atol=1e-3)  # the block's first token saw the rest


@torch.no_grad()
def test_truncate_rolls_the_cache_back(model):
    prompt, pos = prompts(TEXTS[:1])
    state = DecodingState(model, Prompt(prompt, pos), 8)
    state.logits()
    for step, token in enumerate([3, 4, 5, 6]):
        state.append(torch.tensor([token]), pos[:, -1] + step + 1)
        state.logits()
    state.truncate(prompt.shape[1] + 2)      # keep 3, 4; forget 5, 6 and their keys and values
    state.append(torch.tensor([9]), pos[:, -1] + 3)
    fresh = DecodingState(model, Prompt(torch.cat([prompt, torch.tensor([[3, 4, 9]])], 1),
                                        torch.cat([pos, pos[:, -1:] + torch.arange(1, 4)], 1)), 0)
    torch.testing.assert_close(state.logits(), fresh.logits(), atol=1e-5, rtol=1e-5)


def test_a_cached_step_of_several_tokens_must_state_its_mask(model):
    prompt, pos = prompts(TEXTS[:1])
    cache = model.allocate_kv_cache(1, 40)
    model(prompt, pos, kv_cache=cache)
    with pytest.raises(ValueError, match="2 new tokens after .* cached ones need an explicit"):
        model(prompt[:, :2], pos[:, -1:] + torch.arange(1, 3), kv_cache=cache)
