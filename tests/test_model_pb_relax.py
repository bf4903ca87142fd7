"""PB-relax: equal to plain attention / LayerNorm in fp32, finite in fp16 where the plain math overflows."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_t2i.config import ModelConfig
from megatron_t2i.model import GPT, LayerNorm, attention, causal_mask, prefix_visible_mask

torch.set_num_threads(2)
ALPHA = 32.0


def reference_attention(q, k, v, mask):
    """softmax(q kᵀ/√d) v in float64, mask [.., S, T] bool."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(b=2, n=4, s=12, t=12, d=16, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(b, n, s, d, generator=g)
    k = scale * torch.randn(b, n, t, d, generator=g)
    v = torch.randn(b, n, t, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("case", ["causal", "cached-chunk", "single-step", "prefix-visible"])
def test_attention_pb_relax_equals_plain_fp32(case):
    s, t = {"causal": (12, 12), "cached-chunk": (4, 12), "single-step": (1, 12),
            "prefix-visible": (12, 12)}[case]
    q, k, v = qkv(s=s, t=t)
    mask = prefix_visible_mask(12, 5) if case == "prefix-visible" else \
        causal_mask(s, t) if case == "cached-chunk" else None  # a chunk after cached keys says so
    expected = reference_attention(q, k, v, causal_mask(s, t) if mask is None else mask)
    relaxed = attention(q, k, v, mask, pb_relax_alpha=ALPHA)
    plain = attention(q, k, v, mask)  # PyTorch SDPA
    torch.testing.assert_close(relaxed.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.double(), expected, atol=1e-5, rtol=1e-5)


def test_attention_fp16_overflow_only_in_plain_math():
    # keys aligned with queries: q·k/√d reaches ~160000, beyond fp16's 65504 (the late-training
    # scores of the CogView paper)
    q, _, v = qkv(s=8, t=8, d=16, scale=200.0)
    k = q + 20 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    q, k, v = q.half(), k.half(), v.half()
    # the plain fp16 computation of the scores overflows, and softmax turns inf into NaN
    plain_scores = (q / math.sqrt(16)) @ k.transpose(-1, -2)
    assert torch.isinf(plain_scores).any()
    assert torch.isnan(torch.softmax(plain_scores.masked_fill(~causal_mask(8), float("-inf")), -1)).any()
    # PB-relax in fp16 stays finite and matches the float64 reference to fp16 precision
    relaxed = attention(q, k, v, pb_relax_alpha=ALPHA)
    assert relaxed.dtype == torch.float16 and torch.isfinite(relaxed).all()
    torch.testing.assert_close(relaxed.double(), reference_attention(q, k, v, causal_mask(8)),
                               atol=2e-2, rtol=2e-2)


def test_layernorm_pb_relax_equals_plain_fp32():
    torch.manual_seed(0)
    ln = LayerNorm(64, 1e-5, pb_relax=True)
    with torch.no_grad():
        ln.weight.normal_(1, 0.1)
        ln.bias.normal_(0, 0.1)
    # a residual stream with large, uneven token scales (some tokens below the rescale threshold)
    x = torch.randn(3, 10, 64) * torch.logspace(-1, 3, 10)[None, :, None]
    x.requires_grad_(True)
    expected = F.layer_norm(x, (64,), ln.weight, ln.bias, 1e-5)
    out = ln(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    (g_relax,) = torch.autograd.grad(out, x, grad)
    (g_plain,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(g_relax, g_plain, atol=1e-5, rtol=1e-4)


def test_layernorm_fp16_overflow_only_in_plain_math():
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) * 2000
    x16 = x.half()
    # the textbook fp16 variance overflows: (x - mean)² reaches ~1e7
    centred = x16 - x16.mean(-1, keepdim=True)
    assert torch.isinf((centred * centred).mean(-1)).any()
    ln = LayerNorm(64, 1e-5, pb_relax=True).half()
    # PB-relax: inputs scaled to |x| <= 8 first, so the same textbook math stays finite
    scaled = x16 / (x16.abs().amax(-1, keepdim=True) / 8)
    assert torch.isfinite((scaled - scaled.mean(-1, keepdim=True)).pow(2).mean(-1)).all()
    out = ln(x16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), F.layer_norm(x, (64,)), atol=1e-2, rtol=1e-2)


def test_layernorm_per_token_keeps_samples_independent():
    ln = LayerNorm(64, 1e-5, pb_relax=True)
    x = torch.randn(2, 6, 64) * 50
    alone = ln(x[:1])
    x[1] *= 1000  # a batch companion with a much larger max must not change sample 0 at all
    assert torch.equal(ln(x)[:1], alone)


def test_gpt_pb_relax_equals_plain_fp32():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                      max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(32).expand(2, 32)
    logits = []
    for pb_relax in (True, False):
        torch.manual_seed(3)
        model = GPT(replace(cfg, pb_relax=pb_relax)).eval()
        with torch.no_grad():  # inputs of scale ~30: the LayerNorm rescale is active
            model.transformer.position_embeddings.weight.mul_(1500)
            logits.append(model(tokens, pos))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
