"""GPT (TP=1): forward against a from-scratch functional reference, loss, masks, checkpoint layout."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig, model_config
from megatron_t2i.model import (GPT, attention, block_causal_mask, causal_mask,
                                language_model_loss, prefix_visible_mask)

torch.set_num_threads(2)
TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                   max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)


def batch(b=2, s=24, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    return tokens, torch.arange(s).expand(b, s)


# ---- an independent reference: the CogView layer written out from the state dict, in float64 ----

def ref_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_layernorm(x, sd, name, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def ref_forward(model, cfg, tokens, position_ids, mask=None):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    b, s = tokens.shape
    n, d = cfg.num_attention_heads, cfg.head_dim
    mask = torch.ones(s, s).tril().bool() if mask is None else mask
    x = sd["word_embeddings.weight"][tokens] + sd["transformer.position_embeddings.weight"][position_ids]
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        ln = lambda y, name: ref_layernorm(y, sd, p + name, cfg.layernorm_epsilon)  # noqa: E731
        qkv = ln(x, "input_layernorm") @ sd[p + "attention.query_key_value.weight"].T \
            + sd[p + "attention.query_key_value.bias"]
        q, k, v = (t.reshape(b, s, n, d).transpose(1, 2) for t in qkv.split(cfg.hidden_size, -1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, cfg.hidden_size)
        a = ctx @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        if cfg.sandwich_ln:
            a = ln(a, "third_layernorm")
        h = x + a
        m = ref_gelu(ln(h, "post_attention_layernorm") @ sd[p + "mlp.dense_h_to_4h.weight"].T
                     + sd[p + "mlp.dense_h_to_4h.bias"])
        m = m @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
        if cfg.sandwich_ln:
            m = ln(m, "fourth_layernorm")
        x = h + m
    x = ref_layernorm(x, sd, "transformer.final_layernorm", cfg.layernorm_epsilon)
    return x @ sd["word_embeddings.weight"].T


@pytest.mark.parametrize("sandwich_ln,pb_relax", [(True, True), (True, False), (False, False)])
def test_forward_matches_reference(sandwich_ln, pb_relax):
    cfg = replace(TINY, sandwich_ln=sandwich_ln, pb_relax=pb_relax)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm affines, so every term is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tokens, pos = batch()
    with torch.no_grad():
        logits = model(tokens, pos)
    assert logits.shape == (2, 24, 256)
    torch.testing.assert_close(logits.double(), ref_forward(model, cfg, tokens, pos),
                               atol=1e-5, rtol=1e-5)


def test_forward_with_mask_matches_reference():
    torch.manual_seed(2)
    model = GPT(TINY).eval()
    tokens, pos = batch(s=20)
    mask = prefix_visible_mask(20, 7)
    with torch.no_grad():
        logits = model(tokens, pos, attention_mask=mask)
    torch.testing.assert_close(logits.double(), ref_forward(model, TINY, tokens, pos, mask[0, 0]),
                               atol=1e-5, rtol=1e-5)


def test_loss_matches_cross_entropy():
    torch.manual_seed(3)
    logits = torch.randn(2, 10, 256)
    labels = torch.randint(0, 256, (2, 10))
    weights = torch.randint(0, 2, (2, 10)).float() * torch.where(torch.rand(2, 10) < 0.5, 5.0, 1.0)
    mean, per_token = language_model_loss(logits, labels, weights)
    expected = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(per_token.reshape(-1), expected)
    torch.testing.assert_close(mean, (expected * weights.reshape(-1)).sum() / weights.sum())


def test_training_step_and_activation_checkpointing():
    """Dropout on, same seed: checkpointed layers give the same loss and gradients."""
    cfg = replace(TINY, hidden_dropout=0.1, attention_dropout=0.1)
    tokens, pos = batch()
    results = []
    for ckpt in (False, True):
        torch.manual_seed(4)
        model = GPT(replace(cfg, checkpoint_activations=ckpt))
        mpu.model_parallel_seed(5)
        loss, _ = language_model_loss(model(tokens[:, :-1], pos[:, :-1]), tokens[:, 1:],
                                      torch.ones(2, 23))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    assert torch.equal(loss0, loss1)
    assert all(g.abs().sum() > 0 for g in g0.values())  # every parameter takes part
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_masks():
    s = 9
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    assert torch.equal(causal_mask(s)[0, 0], j <= i)
    assert torch.equal(causal_mask(3, s)[0, 0], (j <= i + 6)[:3])  # the last 3 query rows of 9
    assert torch.equal(prefix_visible_mask(s, 4)[0, 0], (j <= i) | ((i < 4) & (j < 4)))
    blocks = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    assert torch.equal(block_causal_mask(blocks)[0, 0], blocks[j] <= blocks[i])
    assert block_causal_mask(torch.stack([blocks, blocks.flip(0)])).shape == (2, 1, s, s)


def test_bad_inputs_fail_with_one_line_errors():
    model = GPT(TINY).eval()
    tokens, pos = batch(s=8)
    with pytest.raises(ValueError, match=r"attention_mask: expected a bool tensor \[B or 1, 1, 8, 8\]"):
        model(tokens, pos, attention_mask=torch.ones(1, 1, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask: expected a bool"):
        attention(*(torch.randn(1, 2, 8, 4),) * 3, mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="tokens and position_ids"):
        model(tokens, pos[:, :4])
    long_tokens, long_pos = batch(s=65)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        model(long_tokens, long_pos)


# ---- the released 4B model: key-for-key checkpoint layout, built on meta without allocating ----

def reference_4b_shapes():
    """REFERENCE.md 'Checkpoint layout', mp=1, for 48 layers x 2560 hidden."""
    h, f = 2560, 10240
    shapes = {"word_embeddings.weight": (58240, h), "transformer.position_embeddings.weight": (1089, h),
              "transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,)}
    for i in range(48):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm", "third_layernorm",
                   "fourth_layernorm"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (h,)
        shapes.update({p + "attention.query_key_value.weight": (3 * h, h),
                       p + "attention.query_key_value.bias": (3 * h,),
                       p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
                       p + "mlp.dense_h_to_4h.weight": (f, h), p + "mlp.dense_h_to_4h.bias": (f,),
                       p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,)})
    return shapes


def test_cogview_4b_on_meta_device():
    model = GPT(model_config("cogview-4b"), device=torch.device("meta"))
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert {k: tuple(v.shape) for k, v in state.items()} == reference_4b_shapes()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 3.93e9) < 0.01e9, n  # "about 3.93 B parameters"
