"""KV-cached decoding equals full recomputation at every step (TP=1 and TP=2)."""
from dataclasses import replace

import pytest
import torch

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.model import GPT, causal_mask, prefix_visible_mask
from tests.distributed import run_distributed

torch.set_num_threads(2)
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                  max_position_embeddings=64, hidden_dropout=0.1, attention_dropout=0.1)
B, S, FIRST = 3, 20, 6  # batch, tokens in all, tokens of the first (prompt) chunk
CHUNKS = [FIRST, FIRST + 3, *range(FIRST + 4, S + 1)]  # boundaries of the later steps


def sequence(seed=0):
    tokens = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(S).expand(B, S)


def decode_in_steps(model, tokens, pos, first_mask=None):
    """The prompt chunk in one call, a chunk of 3 (a block of parallel decoding), then one token
    per call; -> logits [B, S, V] and the cache."""
    cache = model.allocate_kv_cache(B, S)
    steps = [model(tokens[:, :FIRST], pos[:, :FIRST], first_mask, kv_cache=cache, gather_logits=True)]
    for i, j in zip(CHUNKS[:-1], CHUNKS[1:]):
        mask = causal_mask(j - i, j) if j - i > 1 else None  # a chunk after cached tokens says so
        steps.append(model(tokens[:, i:j], pos[:, i:j], mask, kv_cache=cache, gather_logits=True))
    return torch.cat(steps, 1), cache


def build(pb_relax, seed=1):
    torch.manual_seed(seed)
    return GPT(replace(CFG, pb_relax=pb_relax)).eval()


@pytest.mark.parametrize("pb_relax", [True, False])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(pb_relax):
    model = build(pb_relax)
    tokens, pos = sequence()
    seen = []  # the attention input of each call: the prefix must never be fed again
    model.transformer.layers[0].attention.query_key_value.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].shape[1]))
    full = model(tokens, pos)
    seen.clear()
    stepped, cache = decode_in_steps(model, tokens, pos)
    assert seen == [FIRST, 3] + [1] * (S - FIRST - 3)
    assert cache.length == S
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_decoding_with_prefix_visible_prompt():
    model = build(True)
    tokens, pos = sequence(seed=2)
    full = model(tokens, pos, attention_mask=prefix_visible_mask(S, FIRST))
    first_mask = prefix_visible_mask(FIRST, FIRST)  # the prompt attends to itself both ways
    stepped, _ = decode_in_steps(model, tokens, pos, first_mask)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_is_filled_in_place_and_reset():
    model = build(True)
    tokens, pos = sequence()
    cache = model.allocate_kv_cache(B, S)
    storage = [k.data_ptr() for k in cache.keys]
    model(tokens[:, :FIRST], pos[:, :FIRST], kv_cache=cache)
    model(tokens[:, FIRST:FIRST + 1], pos[:, FIRST:FIRST + 1], kv_cache=cache)
    assert [k.data_ptr() for k in cache.keys] == storage  # no concatenation, no reallocation
    cache.reset()
    assert cache.length == 0
    again = model(tokens[:, :4], pos[:, :4], kv_cache=cache, gather_logits=True)
    torch.testing.assert_close(again, model(tokens[:, :4], pos[:, :4]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_select_reorders_batch_rows_for_beam_search():
    model = build(False)
    tokens, pos = sequence(seed=3)
    cache = model.allocate_kv_cache(B, S)
    model(tokens[:, :FIRST], pos[:, :FIRST], kv_cache=cache)
    beams = torch.tensor([2, 0, 0, 1])  # rows may repeat and the batch may grow
    cache.select(beams)
    rest = tokens[beams, FIRST:]  # each beam then continues with its own tokens
    rest[1] = torch.randint(0, 256, (S - FIRST,), generator=torch.Generator().manual_seed(4))
    steps = [model(rest[:, i:i + 1], pos[beams, FIRST + i:FIRST + i + 1], kv_cache=cache)
             for i in range(S - FIRST)]
    expected = model(torch.cat([tokens[beams, :FIRST], rest], 1), pos[beams])[:, FIRST:]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_misuse_fails_with_one_line_errors():
    model = build(True)
    tokens, pos = sequence()
    cache = model.allocate_kv_cache(B, 8)
    with pytest.raises(ValueError, match="KV cache: batch 3 with 10 tokens does not fit"):
        model(tokens[:, :10], pos[:, :10], kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache: batch 2 with 4 tokens"):
        model(tokens[:2, :4], pos[:2, :4], kv_cache=model.allocate_kv_cache(B, 8))
    model(tokens[:, :4], pos[:, :4], kv_cache=cache)  # a mask for 2 new tokens spans all 6 keys
    with pytest.raises(ValueError, match=r"attention_mask: expected a bool tensor \[B or 1, 1, 2, 6\]"):
        model(tokens[:, 4:6], pos[:, 4:6], prefix_visible_mask(2, 2), kv_cache=cache)


def _tensor_parallel_decoding(rank, world_size):
    mpu.initialize_model_parallel(world_size, 1)
    results = {}
    with torch.no_grad():
        for pb_relax in (True, False):
            model = build(pb_relax)
            tokens, pos = sequence()
            assert model.allocate_kv_cache(B, S).keys[0].shape == (B, 2, S, 16)  # 4 heads / 2 ranks
            stepped, _ = decode_in_steps(model, tokens, pos)
            full = model(tokens, pos, gather_logits=True)
            results[pb_relax] = (stepped.numpy(), full.numpy())  # tensors would not outlive the rank
    return results


@pytest.mark.slow
def test_cached_decoding_tensor_parallel():
    results = run_distributed(_tensor_parallel_decoding, 2)
    tokens, pos = sequence()
    for pb_relax in (True, False):
        with torch.no_grad():  # the TP=1 model built from the same seed
            reference = build(pb_relax)(tokens, pos)
        for rank_results in results:
            stepped, full = map(torch.from_numpy, rank_results[pb_relax])
            torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
