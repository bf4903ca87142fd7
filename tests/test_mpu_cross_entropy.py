"""Vocab-parallel cross entropy against torch.nn.functional.cross_entropy on the full logits."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_t2i import mpu
from tests.distributed import run_distributed

BATCH, SEQ, VOCAB = 2, 5, 16


def _problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    # large logits: a naive exp() overflows, the max subtraction must be global
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=g) * 30).to(dtype)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    target[0, :2] = torch.tensor([0, VOCAB - 1])  # ids at both ends of the vocabulary
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[1, 3:] = 0  # padding: excluded from the loss
    return logits, target, loss_mask


def _masked_mean(per_token, loss_mask):
    return (per_token.float() * loss_mask).sum() / loss_mask.sum()


def _reference(logits, target, loss_mask):
    """Full-logit fp32 loss and gradient, by torch."""
    logits = logits.detach().float().requires_grad_()
    per_token = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), reduction="none")
    loss = _masked_mean(per_token.view(BATCH, SEQ), loss_mask)
    loss.backward()
    return per_token.view(BATCH, SEQ).detach(), loss.detach(), logits.grad


def _parallel(logits_parallel, target, loss_mask):
    logits_parallel = logits_parallel.detach().clone().requires_grad_()
    before = logits_parallel.detach().clone()
    per_token = mpu.vocab_parallel_cross_entropy(logits_parallel, target)
    loss = _masked_mean(per_token, loss_mask)
    loss.backward()
    assert torch.equal(logits_parallel, before), "the input logits were modified"
    return per_token.detach(), loss.detach(), logits_parallel.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tp1_matches_torch_cross_entropy(dtype):
    logits, target, loss_mask = _problem(dtype)
    per_token, loss, grad = _parallel(logits, target, loss_mask)
    ref_per_token, ref_loss, ref_grad = _reference(logits, target, loss_mask)
    assert per_token.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(per_token, ref_per_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # the gradient itself is rounded to the input dtype
    torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=0, atol=1e-6 if dtype == torch.float32
                               else 1e-3)
    assert grad[1, 3:].abs().max() == 0  # masked positions receive no gradient


def test_shape_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match=r"logits \(2, 5, 16\) do not match target \(2, 4\)"):
        mpu.vocab_parallel_cross_entropy(torch.zeros(2, 5, 16), torch.zeros(2, 4, dtype=torch.long))


def _run(rank, world_size):
    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    for dtype in (torch.float32, torch.bfloat16):
        logits, target, loss_mask = _problem(dtype)
        ref_per_token, ref_loss, ref_grad = _reference(logits, target, loss_mask)
        per_token, loss, grad = _parallel(logits.chunk(world_size, -1)[rank], target, loss_mask)
        torch.testing.assert_close(per_token, ref_per_token, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        shards = [torch.empty_like(grad) for _ in range(world_size)]
        dist.all_gather(shards, grad)
        torch.testing.assert_close(torch.cat(shards, -1), ref_grad.to(dtype), rtol=0,
                                   atol=1e-6 if dtype == torch.float32 else 1e-3)
    return "ok"


@pytest.mark.slow
def test_tp2_matches_torch_cross_entropy():
    assert run_distributed(_run, 2) == ["ok", "ok"]
