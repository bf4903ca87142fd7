"""Sampling: top-k / top-p per row at any batch size, per-sample random streams, the drawn
distribution, classifier-free guidance."""
import math

import pytest
import torch

from megatron_t2i.generation.sampling import (SamplingConfig, classifier_free_guidance,
                                              filter_logits, sample)

torch.set_num_threads(1)


def random_logits(batch=6, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


def kept_by_definition(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Plain-Python reference for one row: the k largest (ties kept), then the most probable
    tokens in order until the mass of those already taken exceeds top_p."""
    values = row.tolist()
    ids = range(len(values))
    if top_k:
        kth = sorted(values, reverse=True)[top_k - 1]
        ids = [i for i in ids if values[i] >= kth]
    if top_p:
        z = sum(math.exp(values[i]) for i in ids)
        taken, mass = [], 0.0
        for i in sorted(ids, key=lambda i: -values[i]):
            if mass > top_p:
                break
            taken.append(i)
            mass += math.exp(values[i]) / z
        ids = taken
    return set(ids)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (10, 0.0), (10, 0.8), (1, 0.0)])
def test_filter_is_per_row_at_any_batch_size(top_k, top_p):
    logits = random_logits()
    batched = filter_logits(logits, top_k, top_p)
    for i, row in enumerate(logits):
        alone = filter_logits(row[None], top_k, top_p)[0]
        assert torch.equal(batched[i], alone)  # batch 6 == six batches of 1
        kept = set(torch.nonzero(torch.isfinite(batched[i])).flatten().tolist())
        assert kept == kept_by_definition(row, top_k, top_p)
        assert torch.equal(batched[i][list(kept)], row[list(kept)])  # kept logits unchanged


def test_top_p_differs_between_rows():
    # a peaked row keeps one token, a flat row keeps most of them: one shared cut could not
    logits = torch.stack([torch.tensor([10.0] + [0.0] * 9), torch.zeros(10)])
    kept = torch.isfinite(filter_logits(logits, 0, 0.9)).sum(1).tolist()
    assert kept == [1, 9]


def test_filter_keeps_ties_and_the_best_token():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, -1.0, -2.0, -3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=1, top_p=0.0))
    assert kept.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 1e-6)).sum(1).tolist() == [1, 1]


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_per_sample_seeds_ignore_batch_composition():
    logits = random_logits(batch=4, vocab=40, seed=1)
    cfg = SamplingConfig(temperature=1.3, top_k=20, top_p=0.95)
    seeds = [11, 22, 33, 44]
    together = sample(logits, cfg, generators(seeds))
    # the same rows drawn alone, and in another order, with the same seeds
    alone = torch.cat([sample(logits[i:i + 1], cfg, generators([s])) for i, s in enumerate(seeds)])
    order = [2, 0, 3, 1]
    shuffled = sample(logits[order], cfg, generators([seeds[i] for i in order]))
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, together[order])


def test_a_stream_advances_the_same_in_every_batch():
    # ten steps of row 0 with seed 5: alone, or beside another row with seed 6
    logits = random_logits(batch=2, vocab=30, seed=2) / 3  # flat enough to vary
    cfg = SamplingConfig(top_k=5)
    solo, pair = generators([5]), generators([5, 6])
    a = [sample(logits[:1], cfg, solo).item() for _ in range(10)]
    b = [sample(logits, cfg, pair)[0].item() for _ in range(10)]
    assert a == b
    assert len(set(a)) > 1  # it is random


def test_draws_follow_softmax_of_tempered_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    temperature, n = 0.7, 20000
    torch.manual_seed(0)
    draws = sample(logits.expand(n, -1), SamplingConfig(temperature))  # n rows, default generator
    counts = torch.bincount(draws, minlength=5).float()
    expected = torch.softmax(logits[0] / temperature, 0) * n
    assert counts[4] == 0  # masked tokens are never drawn
    chi2 = (((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum().item()
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_default_generator_and_mismatched_generators():
    torch.manual_seed(0)
    first = sample(random_logits(), SamplingConfig())
    torch.manual_seed(0)
    assert torch.equal(first, sample(random_logits(), SamplingConfig()))
    with pytest.raises(ValueError, match="2 generators for a batch of 6 rows"):
        sample(random_logits(), SamplingConfig(), generators([1, 2]))


def test_classifier_free_guidance():
    cond, uncond = random_logits(seed=3), random_logits(seed=4)
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), cond)
    guided = classifier_free_guidance(cond, uncond, 2.0)
    torch.testing.assert_close(guided, 3 * cond - 2 * uncond)
    # per-row constants (logits are defined up to one) change nothing after the softmax
    shifted = classifier_free_guidance(cond + 5.0, uncond - torch.arange(6.0)[:, None], 2.0)
    torch.testing.assert_close(torch.softmax(shifted, -1), torch.softmax(guided, -1))


def test_config_validation():
    for bad in (dict(temperature=0), dict(top_k=-1), dict(top_p=1.0)):
        with pytest.raises(ValueError, match="sampling:"):
            SamplingConfig(**bad)
