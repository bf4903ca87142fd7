"""Process-group layout of megatron_t2i.mpu.state: TP innermost, PP outermost, DP in between."""
import pytest
import torch
import torch.distributed as dist

from megatron_t2i import mpu
from tests.distributed import run_distributed

# written out by hand from the layout rule global = pp * (DP * TP) + dp * TP + tp
WORLD8_TP2_PP2 = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
    "embedding": [[0, 4], [1, 5], [2, 6], [3, 7]],
}
WORLD4_TP2_PP2 = {
    "tp": [[0, 1], [2, 3]],
    "pp": [[0, 2], [1, 3]],
    "dp": [[0], [1], [2], [3]],
    "mp": [[0, 1, 2, 3]],
    "embedding": [[0, 2], [1, 3]],
}
WORLD4_TP1_PP2 = {
    "tp": [[0], [1], [2], [3]],
    "pp": [[0, 2], [1, 3]],
    "dp": [[0, 1], [2, 3]],
    "mp": [[0, 2], [1, 3]],
    "embedding": [[0, 2], [1, 3]],
}


def test_group_ranks_world8_tp2_pp2():
    assert mpu.parallel_group_ranks(8, 2, 2) == WORLD8_TP2_PP2


def test_group_ranks_megatron_example_16_ranks_tp2_pp4():
    # the example in Megatron-LM's initialize_model_parallel docstring (16 GPUs, TP=2, PP=4, DP=2)
    layout = mpu.parallel_group_ranks(16, 2, 4)
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert layout["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert layout["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]


def test_group_ranks_single_stage_embedding_is_the_rank_alone():
    assert mpu.parallel_group_ranks(2, 2, 1)["embedding"] == [[0], [1]]


@pytest.mark.parametrize("world,tp,pp", [(6, 4, 1), (8, 3, 2), (4, 0, 1)])
def test_bad_sizes_raise_one_line_error(world, tp, pp):
    with pytest.raises(ValueError, match="model parallel") as err:
        mpu.parallel_group_ranks(world, tp, pp)
    assert "\n" not in str(err.value)


def test_defaults_without_torch_distributed():
    assert not dist.is_initialized()
    assert not mpu.model_parallel_is_initialized()
    for getter in (mpu.get_tensor_model_parallel_world_size, mpu.get_pipeline_model_parallel_world_size,
                   mpu.get_data_parallel_world_size):
        assert getter() == 1
    for getter in (mpu.get_tensor_model_parallel_rank, mpu.get_pipeline_model_parallel_rank,
                   mpu.get_data_parallel_rank, mpu.get_tensor_model_parallel_src_rank):
        assert getter() == 0
    assert mpu.is_pipeline_first_stage() and mpu.is_pipeline_last_stage()
    with pytest.raises(RuntimeError, match="not initialised"):
        mpu.get_tensor_model_parallel_group()
    with pytest.raises(RuntimeError, match="torch.distributed must be initialised"):
        mpu.initialize_model_parallel(1, 1)


def _members(group):
    """The global ranks of `group`, found by communicating over it (not by asking the bookkeeping)."""
    me = torch.tensor([dist.get_rank()])
    gathered = [torch.zeros_like(me) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, me, group=group)
    return [int(t) for t in gathered]


def _observe(rank):
    groups = {"tp": mpu.get_tensor_model_parallel_group(), "pp": mpu.get_pipeline_model_parallel_group(),
              "dp": mpu.get_data_parallel_group(), "mp": mpu.get_model_parallel_group(),
              "embedding": mpu.get_embedding_group()}
    return {
        "members": {kind: _members(group) for kind, group in groups.items()},
        "ranks": (mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(),
                  mpu.get_data_parallel_rank()),
        "sizes": (mpu.get_tensor_model_parallel_world_size(),
                  mpu.get_pipeline_model_parallel_world_size(), mpu.get_data_parallel_world_size()),
        "stages": (mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()),
        "src": mpu.get_tensor_model_parallel_src_rank(),
    }


def _world4(rank, world_size):
    results = []
    for tp, pp in ((2, 2), (1, 2)):
        mpu.initialize_model_parallel(tp, pp)
        results.append(_observe(rank))
        mpu.destroy_model_parallel()
    try:
        mpu.initialize_model_parallel(3, 1)
    except ValueError as e:
        results.append(str(e))
    results.append(mpu.get_tensor_model_parallel_world_size())  # back to defaults after destroy
    return results


def _expected(layout, rank):
    return {kind: next(ranks for ranks in groups if rank in ranks) for kind, groups in layout.items()}


@pytest.mark.slow
def test_world4_groups_communicate_as_laid_out():
    results = run_distributed(_world4, 4)
    for rank, (tp2pp2, tp1pp2, error, tp_after_destroy) in enumerate(results):
        assert tp2pp2["members"] == _expected(WORLD4_TP2_PP2, rank)
        assert tp2pp2["ranks"] == (rank % 2, rank // 2, 0)
        assert tp2pp2["sizes"] == (2, 2, 1)
        assert tp2pp2["stages"] == (rank < 2, rank >= 2)
        assert tp2pp2["src"] == rank // 2 * 2

        assert tp1pp2["members"] == _expected(WORLD4_TP1_PP2, rank)
        assert tp1pp2["ranks"] == (0, rank // 2, rank % 2)
        assert tp1pp2["sizes"] == (1, 2, 2)
        assert tp1pp2["src"] == rank

        assert error == ("model parallel: world size 4 is not divisible by tensor_model_parallel_size "
                         "(3) x pipeline_model_parallel_size (1)")
        assert tp_after_destroy == 1
