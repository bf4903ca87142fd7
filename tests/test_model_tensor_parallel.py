"""TP=2 equals TP=1: logits, loss and reassembled gradients, with dropout and activation checkpointing."""
from dataclasses import replace

import pytest
import torch

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.model import GPT, language_model_loss
from tests.distributed import run_distributed

torch.set_num_threads(2)
# attention-probability dropout draws from the per-rank tracked stream, which cannot reproduce the
# TP=1 masks; hidden and embedding dropout run on the default stream and must match TP=1 exactly
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                  max_position_embeddings=64, hidden_dropout=0.1, attention_dropout=0.0)
ATTENTION_DROPOUT = replace(CFG, hidden_dropout=0.0, attention_dropout=0.2)


def train_step(cfg, checkpoint_activations=False, seed=7):
    """One forward/backward in train mode -> (this rank's logits [B, S, V/tp], loss, grads)."""
    torch.manual_seed(0)  # the weights: the same full tensors whatever the TP size
    model = GPT(replace(cfg, checkpoint_activations=checkpoint_activations)).train()
    mpu.model_parallel_seed(seed)  # the dropout streams
    data = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32).expand(2, 32)
    loss_mask = torch.ones(2, 32)
    loss_mask[0, :5] = 0
    logits = model(data[:, :-1], pos)
    loss, _ = language_model_loss(logits, data[:, 1:], loss_mask)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def as_numpy(step):
    logits, loss, grads = step  # tensors would not outlive the rank's process
    return logits.numpy(), loss.item(), {n: g.numpy() for n, g in grads.items()}


def _tp2(rank, world_size):
    mpu.initialize_model_parallel(world_size, 1)
    plain = train_step(CFG)
    checkpointed = train_step(CFG, checkpoint_activations=True)
    # attention dropout: deterministic, recompute-safe, and really active
    first, again = train_step(ATTENTION_DROPOUT), train_step(ATTENTION_DROPOUT)
    recomputed = train_step(ATTENTION_DROPOUT, checkpoint_activations=True)
    other_seed = train_step(ATTENTION_DROPOUT, seed=8)
    for step in (again, recomputed):
        assert torch.equal(step[1], first[1])
        for name, grad in first[2].items():
            torch.testing.assert_close(step[2][name], grad, atol=1e-7, rtol=1e-6, msg=name)
    assert abs(other_seed[1] - first[1]) > 1e-4
    return as_numpy(plain), as_numpy(checkpointed)


def full_tensor(name, shards):
    """Reassemble a TP=2 parameter (or gradient) from its shards, by the CogView split rules."""
    if "query_key_value" in name:  # each shard is [Q_r; K_r; V_r]
        pieces = [s.chunk(3, 0) for s in shards]
        return torch.cat([p[i] for i in range(3) for p in pieces])
    if "dense_h_to_4h" in name or name == "word_embeddings.weight":
        return torch.cat(shards, 0)
    if name.endswith("dense.weight") or name.endswith("dense_4h_to_h.weight"):
        return torch.cat(shards, 1)
    torch.testing.assert_close(shards[0], shards[1], atol=0, rtol=0, msg=f"{name} replicated")
    return shards[0]


@pytest.mark.slow
def test_tensor_parallel_equals_single_process():
    logits1, loss1, grads1 = train_step(CFG)
    assert abs(train_step(replace(CFG, hidden_dropout=0.0))[1] - loss1) > 1e-4  # dropout is on
    ranks = run_distributed(_tp2, 2)
    for variant in range(2):  # 0: plain, 1: activation checkpointing
        steps = [ranks[r][variant] for r in range(2)]
        logits = torch.cat([torch.from_numpy(s[0]) for s in steps], -1)  # vocab halves
        torch.testing.assert_close(logits, logits1, atol=1e-5, rtol=1e-5)
        for s in steps:
            assert abs(s[1] - loss1.item()) < 1e-5
        assert grads1.keys() == steps[0][2].keys()
        for name, grad in grads1.items():
            full = full_tensor(name, [torch.from_numpy(s[2][name]) for s in steps])
            torch.testing.assert_close(full, grad, atol=1e-5, rtol=1e-5, msg=name)
