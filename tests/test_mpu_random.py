"""RNG streams: the default one agrees across TP ranks, the tracked one differs, fork restores the
default stream, and checkpoint's recompute draws the same dropout masks as the forward."""
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from megatron_t2i import mpu
from tests.distributed import run_distributed

SEED = 1234


def _all_gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _run(rank, world_size):
    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    mpu.model_parallel_seed(SEED)
    # independent references: plain generators seeded by the documented rule
    default_ref = torch.Generator().manual_seed(SEED)
    tracked_ref = torch.Generator().manual_seed(SEED + 2718 + rank)

    before = torch.rand(6)
    with mpu.get_rng_tracker().fork():
        inside = torch.rand(6)
    after = torch.rand(6)
    with mpu.get_rng_tracker().fork():
        inside_again = torch.rand(6)

    a, b = _all_gather(before)
    assert torch.equal(a, b), "default stream differs across TP ranks"
    a, b = _all_gather(inside)
    assert not torch.equal(a, b), "tracked stream is the same on all TP ranks"
    torch.testing.assert_close(before, torch.rand(6, generator=default_ref), rtol=0, atol=0)
    torch.testing.assert_close(after, torch.rand(6, generator=default_ref), rtol=0, atol=0,
                               msg="fork disturbed the default stream")
    torch.testing.assert_close(inside, torch.rand(6, generator=tracked_ref), rtol=0, atol=0)
    torch.testing.assert_close(inside_again, torch.rand(6, generator=tracked_ref), rtol=0, atol=0,
                               msg="the tracked stream did not continue where it stopped")
    return "ok"


@pytest.mark.slow
def test_streams_across_tp_ranks():
    assert run_distributed(_run, 2) == ["ok", "ok"]


def test_states_round_trip_through_a_checkpoint_file():
    mpu.model_parallel_seed(SEED)
    tracker = mpu.get_rng_tracker()
    buffer = io.BytesIO()
    torch.save(tracker.get_states(), buffer)
    with tracker.fork():
        first = torch.rand(4)
    buffer.seek(0)
    tracker.set_states(torch.load(buffer, weights_only=True))
    with tracker.fork():
        again = torch.rand(4)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_tracker_errors():
    mpu.model_parallel_seed(SEED)
    tracker = mpu.get_rng_tracker()
    with pytest.raises(ValueError, match="already exists"):
        tracker.add(mpu.MODEL_PARALLEL_RNG, 5)
    with pytest.raises(ValueError, match="seed 3952 is already used"):
        tracker.add("other", SEED + 2718)
    with pytest.raises(KeyError, match="no state named 'nope'"):
        with tracker.fork("nope"):
            pass


class _Block(torch.nn.Module):
    """Dropout on replicated activations (default stream) and inside a split region (tracked)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = F.dropout(torch.tanh(self.up(x)), p=0.5, training=True)
        with mpu.get_rng_tracker().fork():
            h = F.dropout(h, p=0.5, training=True)
        return self.down(h)


def _gradients(checkpoint_fn):
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(4, 8, requires_grad=True)
    mpu.model_parallel_seed(SEED)
    y = block(x) if checkpoint_fn is None else checkpoint_fn(block, x)
    z = block(y)  # a second, plain use of both streams between forward and recompute
    (z * torch.linspace(-1, 1, 8)).sum().backward()
    with mpu.get_rng_tracker().fork():  # where the streams stand after the backward
        next_tracked = torch.rand(3)
    grads = [x.grad] + [p.grad for p in block.parameters()]
    return grads, torch.rand(3), next_tracked


def test_checkpoint_with_dropout_gives_the_gradients_of_no_checkpoint():
    grads, next_default, next_tracked = _gradients(None)
    ck_grads, ck_default, ck_tracked = _gradients(mpu.checkpoint)
    for g, ck in zip(grads, ck_grads):
        torch.testing.assert_close(ck, g, rtol=0, atol=0)
    # the recompute left both streams where the forward had left them
    torch.testing.assert_close(ck_default, next_default, rtol=0, atol=0)
    torch.testing.assert_close(ck_tracked, next_tracked, rtol=0, atol=0)


def test_plain_torch_checkpoint_would_not_replay_the_tracked_stream():
    # the control: without the tracker replay the recompute draws other masks, so the test above
    # really depends on it
    grads, _, _ = _gradients(None)
    plain = lambda fn, x: torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)  # noqa: E731
    plain_grads, _, _ = _gradients(plain)
    assert any(not torch.equal(g, p) for g, p in zip(grads, plain_grads))
