"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

The world of TP x PP x DP ranks is laid out with TP innermost and PP outermost:

    global_rank = pp_rank * (DP * TP) + dp_rank * TP + tp_rank

so the ranks of one TP group are consecutive (same node, fastest links, most traffic), and DeepSpeed's
pipeline topology (axes pipe, data, model) numbers the ranks the same way. Example, 8 ranks, TP=2 PP=2:

    TP groups [0,1] [2,3] [4,5] [6,7]      PP groups [0,4] [1,5] [2,6] [3,7]
    DP groups [0,2] [1,3] [4,6] [5,7]      model-parallel (TP x PP) groups [0,1,4,5] [2,3,6,7]
    embedding groups (first + last stage of each pipeline) [0,4] [1,5] [2,6] [3,7]

Without `initialize_model_parallel` (a plain single process, torch.distributed not even initialised)
every world-size getter returns 1 and every rank getter 0, so the model code needs no special case.
"""
from __future__ import annotations

import torch.distributed as dist

_GROUPS: dict | None = None  # filled by initialize_model_parallel: name -> process group (or None)
_SIZES = {"tp": 1, "pp": 1, "dp": 1}
_RANKS = {"tp": 0, "pp": 0, "dp": 0}


def parallel_group_ranks(world_size: int, tensor_model_parallel_size: int = 1,
                         pipeline_model_parallel_size: int = 1) -> dict[str, list[list[int]]]:
    """The global ranks of every group of each kind: {"tp", "pp", "dp", "mp", "embedding"} -> groups.

    Pure arithmetic (no communication), so layouts of any size can be checked without processes.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model parallel: {name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        raise ValueError(f"model parallel: world size {world_size} is not divisible by "
                         f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp})")
    dp = world_size // (tp * pp)

    def rank(p, d, t):
        return p * dp * tp + d * tp + t

    pipelines = [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return {
        "tp": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "pp": pipelines,
        "dp": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "mp": [[rank(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
        # tied word embeddings live on the first and the last stage; one stage means no partner
        "embedding": [sorted({ranks[0], ranks[-1]}) for ranks in pipelines],
    }


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1) -> None:
    """Create the TP, PP, DP, model-parallel and embedding groups. Collective: call on every rank."""
    global _GROUPS
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("model parallel: torch.distributed must be initialised before "
                           "initialize_model_parallel (e.g. torch.distributed.init_process_group)")
    world, me = dist.get_world_size(), dist.get_rank()
    layout = parallel_group_ranks(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    groups, ranks_in, sizes = {"embedding": None}, {}, {}  # middle pipeline stages: no embedding
    for kind, all_ranks in layout.items():
        for ranks in all_ranks:
            group = dist.new_group(ranks)  # every rank must create every group, in the same order
            if me in ranks:
                groups[kind], ranks_in[kind], sizes[kind] = group, ranks.index(me), len(ranks)
    _GROUPS = groups
    _RANKS.update({kind: ranks_in[kind] for kind in _RANKS})
    _SIZES.update({kind: sizes[kind] for kind in _SIZES})


def global_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    """Forget the groups (back to the single-process defaults); torch.distributed stays up."""
    global _GROUPS
    _GROUPS = None
    _SIZES.update(tp=1, pp=1, dp=1)
    _RANKS.update(tp=0, pp=0, dp=0)


def _group(kind: str):
    if _GROUPS is None:
        raise RuntimeError("model parallel is not initialised: call "
                           "megatron_t2i.mpu.initialize_model_parallel first")
    return _GROUPS[kind]


def get_tensor_model_parallel_group():
    return _group("tp")


def get_pipeline_model_parallel_group():
    return _group("pp")


def get_data_parallel_group():
    return _group("dp")


def get_model_parallel_group():
    return _group("mp")


def get_embedding_group():
    """The {first, last} stage group of this rank's pipeline; None on middle stages."""
    return _group("embedding")


def get_tensor_model_parallel_world_size() -> int:
    return _SIZES["tp"]


def get_pipeline_model_parallel_world_size() -> int:
    return _SIZES["pp"]


def get_data_parallel_world_size() -> int:
    return _SIZES["dp"]


def get_tensor_model_parallel_rank() -> int:
    return _RANKS["tp"]


def get_pipeline_model_parallel_rank() -> int:
    return _RANKS["pp"]


def get_data_parallel_rank() -> int:
    return _RANKS["dp"]


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (consecutive ranks: round down)."""
    if _GROUPS is None:
        return 0
    tp = get_tensor_model_parallel_world_size()
    return dist.get_rank() // tp * tp
