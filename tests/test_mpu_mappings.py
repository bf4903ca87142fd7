"""TP-region mappings: forward and backward at TP=2 against the single-process computation they split."""
import pytest
import torch

from megatron_t2i import mpu
from tests.distributed import run_distributed

SHAPE = (3, 4, 6)  # [batch, seq, hidden]; hidden splits in two


def _tensor(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(rank, world_size):
    # assertions run in the ranks: tensors cannot travel back through run_distributed's queue
    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    half = slice(rank * 3, rank * 3 + 3)

    # copy: every rank reads the same x and uses it with its own weight w_r;
    # reference: d/dx sum_r <x, w_r> = sum_r w_r
    x = _tensor(0).requires_grad_()
    y = mpu.copy_to_tensor_model_parallel_region(x)
    (y * _tensor(10 + rank)).sum().backward()
    torch.testing.assert_close(y, _tensor(0), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, _tensor(10) + _tensor(11))

    # reduce: rank r holds a partial x_r; forward is sum_r x_r, a downstream loss <y, w> (same w on
    # every rank: the computation after the region is replicated) gives d/dx_r = w
    x = _tensor(20 + rank).requires_grad_()
    y = mpu.reduce_from_tensor_model_parallel_region(x)
    (y * _tensor(30)).sum().backward()
    torch.testing.assert_close(y, _tensor(20) + _tensor(21))
    torch.testing.assert_close(x.grad, _tensor(30), rtol=0, atol=0)
    torch.testing.assert_close(x, _tensor(20 + rank), rtol=0, atol=0)  # input left intact

    # scatter: rank r keeps x[..., r-th half] and weighs it with its half of W;
    # reference: sum_r <x_r, W_r> = <x, W>, so d/dx = W on every rank
    x = _tensor(40).requires_grad_()
    y = mpu.scatter_to_tensor_model_parallel_region(x)
    (y * _tensor(50)[..., half]).sum().backward()
    torch.testing.assert_close(y, _tensor(40)[..., half], rtol=0, atol=0)
    torch.testing.assert_close(x.grad, _tensor(50), rtol=0, atol=0)

    # gather: rank r holds the r-th half of a full x; forward is the full x, a replicated loss <y, W>
    # gives d/dx_r = W's r-th half
    x = _tensor(60)[..., half].clone().requires_grad_()
    y = mpu.gather_from_tensor_model_parallel_region(x)
    (y * _tensor(70)).sum().backward()
    torch.testing.assert_close(y, _tensor(60), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, _tensor(70)[..., half], rtol=0, atol=0)

    with pytest.raises(ValueError, match="last dimension 5 is not divisible by the tensor parallel "
                                         "size 2"):
        mpu.scatter_to_tensor_model_parallel_region(torch.zeros(2, 5))
    return "ok"


@pytest.mark.slow
def test_mappings_tp2_match_single_process_reference():
    assert run_distributed(_run, 2) == ["ok", "ok"]


@pytest.mark.parametrize("mapping", [mpu.copy_to_tensor_model_parallel_region,
                                     mpu.reduce_from_tensor_model_parallel_region,
                                     mpu.scatter_to_tensor_model_parallel_region,
                                     mpu.gather_from_tensor_model_parallel_region])
def test_mappings_are_identity_without_distributed(mapping):
    x = _tensor(0).requires_grad_()
    y = mapping(x)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    w = _tensor(1)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w, rtol=0, atol=0)
