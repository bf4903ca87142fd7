"""broadcast_data: TP rank 0's batch reaches its TP peers; separate TP groups keep their own data."""
import pytest
import torch

from megatron_t2i import mpu
from tests.distributed import run_distributed


def _batch(rank):
    """A batch only `rank` can make (the others pass None or their own)."""
    g = torch.Generator().manual_seed(100 + rank)
    return {"tokens": torch.randint(0, 1000, (2, 7), generator=g),
            "position_ids": torch.arange(7).repeat(2, 1) + rank,
            "scalar": torch.tensor(rank),
            "loss_mask": torch.rand(2, 7, generator=g),
            "empty": torch.zeros(0, 3)}


INT_KEYS = ["tokens", "position_ids", "scalar"]
FLOAT_KEYS = ["loss_mask", "empty"]


def _check(received, sent, keys):
    assert list(received) == keys
    for key in keys:
        assert received[key].dtype == sent[key].dtype and received[key].shape == sent[key].shape
        assert torch.equal(received[key], sent[key]), key


def _run(rank, world_size):
    # TP=2: rank 1 receives rank 0's batch
    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    data = _batch(rank) if rank == 0 else None
    _check(mpu.broadcast_data(INT_KEYS, data, torch.int64), _batch(0), INT_KEYS)
    _check(mpu.broadcast_data(FLOAT_KEYS, data, torch.float32), _batch(0), FLOAT_KEYS)
    # the source's bad input fails on every rank instead of leaving the peer waiting
    bad = _batch(0) if rank == 0 else None
    with pytest.raises(ValueError, match="'loss_mask' has dtype torch.float32, expected torch.int64"
                       if rank == 0 else "the source rank 0 rejected the batch"):
        mpu.broadcast_data(["tokens", "loss_mask"], bad, torch.int64)
    mpu.destroy_model_parallel()

    # TP=1, DP=2: each rank is its own source and keeps its own batch
    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    _check(mpu.broadcast_data(INT_KEYS, _batch(rank), torch.int64), _batch(rank), INT_KEYS)
    return "ok"


def test_broadcast_within_tensor_parallel_group():
    assert run_distributed(_run, 2) == ["ok", "ok"]


def test_single_process_returns_the_batch():
    batch = _batch(0)
    _check(mpu.broadcast_data(INT_KEYS, batch, torch.int64), batch, INT_KEYS)
    with pytest.raises(ValueError, match="key 'missing' missing from data"):
        mpu.broadcast_data(["missing"], batch, torch.int64)
    with pytest.raises(ValueError, match="must pass the data dict, got None"):
        mpu.broadcast_data(INT_KEYS, None, torch.int64)
