"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Initialisation does not depend on the parallel size: every rank builds the FULL weight on the CPU from
the default generator (identical on all TP ranks, see random.py), applies `init_method` to it, and keeps
its own slice. A TP=2 model is therefore exactly the slices of the TP=1 model built from the same seed,
which makes equivalence tests and checkpoint resharding simple.

Every parameter carries `tensor_model_parallel` (bool), `partition_dim` and `partition_stride`, so
checkpoint code can gather shards (`gather_tensor_along_dim`) and split them again for another TP size
(`split_tensor_along_dim`); DeepSpeed reads `tensor_model_parallel` for gradient-norm clipping.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region,
                                       scatter_to_tensor_model_parallel_region)
from megatron_t2i.mpu.state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init_method(std: float = 0.02) -> InitMethod:
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


def split_tensor_along_dim(t: torch.Tensor, dim: int, world: int, rank: int,
                           stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of `t` along `dim` (a new contiguous tensor).

    With stride k, `dim` holds k interleaved blocks (a fused QKV weight: rows [Q; K; V]) and the shard
    is each block's rank-th piece, concatenated: [Q_r; K_r; V_r].
    """
    if t.size(dim) % (world * stride):
        raise ValueError(f"tensor split: size {t.size(dim)} of dim {dim} is not divisible by "
                         f"world {world} x stride {stride}")
    blocks = t.chunk(stride, dim)
    return torch.cat([block.chunk(world, dim)[rank] for block in blocks], dim)


def gather_tensor_along_dim(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of split_tensor_along_dim: the full tensor from all ranks' shards, in rank order."""
    for shard in shards:
        if shard.size(dim) % stride:
            raise ValueError(f"tensor gather: shard size {shard.size(dim)} of dim {dim} is not "
                             f"divisible by stride {stride}")
    pieces = [shard.chunk(stride, dim) for shard in shards]  # per rank: its piece of every block
    return torch.cat([rank_pieces[b] for b in range(stride) for rank_pieces in pieces], dim)


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int,
                                         stride: int = 1) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = stride


def _check_divisible(layer: str, field: str, size: int, world: int, stride: int = 1) -> None:
    if size % (world * stride):
        extra = f" x stride {stride}" if stride > 1 else ""
        raise ValueError(f"{layer}: {field} {size} is not divisible by the tensor parallel "
                         f"size {world}{extra}")


def _partitioned_weight(shape: tuple[int, int], partition_dim: int, stride: int,
                        init_method: InitMethod | None, dtype: torch.dtype, device) -> nn.Parameter:
    if _device(device).type == "meta":  # shapes only (parameter counts): no full weight, no init
        shard_shape = list(shape)
        shard_shape[partition_dim] //= get_tensor_model_parallel_world_size()
        weight = nn.Parameter(torch.empty(shard_shape, dtype=dtype, device="meta"))
        set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
        return weight
    # full weight on the CPU in (at least) fp32: same values whatever the TP size, dtype or device
    full = torch.empty(shape, dtype=torch.promote_types(dtype, torch.float32), device="cpu")
    (init_method or normal_init_method())(full)
    shard = split_tensor_along_dim(full, partition_dim, get_tensor_model_parallel_world_size(),
                                   get_tensor_model_parallel_rank(), stride)
    weight = nn.Parameter(shard.to(device=device, dtype=dtype))
    set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
    return weight


def _zero_bias(size: int, is_parallel: bool, stride: int, dtype: torch.dtype, device) -> nn.Parameter:
    bias = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
    set_tensor_model_parallel_attributes(bias, is_parallel, 0, stride)
    return bias


def _device(device):
    return torch.get_default_device() if device is None else torch.device(device)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output rows split over TP ranks: weight [output_size / tp, input_size].

    forward: x [..., input_size] (same on all TP ranks) -> [..., output_size / tp], or the full
    [..., output_size] with gather_output. With stride k the output holds k blocks (fused QKV) and each
    rank keeps its piece of every block; a gathered output is put back in full [Q; K; V] order.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, init_method: InitMethod | None = None, stride: int = 1,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        _check_divisible("ColumnParallelLinear", "output_size", output_size, world, stride)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // world
        self.gather_output, self.stride = gather_output, stride
        device = _device(device)
        self.weight = _partitioned_weight((output_size, input_size), 0, stride, init_method,
                                          params_dtype, device)
        if bias:
            self.bias = _zero_bias(self.output_size_per_partition, True, stride, params_dtype, device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_model_parallel_region(x)  # backward sums the ranks' input gradients
        y = F.linear(x, self.weight, self.bias)       # [..., output_size / tp]
        if not self.gather_output:
            return y
        y = gather_from_tensor_model_parallel_region(y)  # [..., output_size] in rank order
        if self.stride > 1:  # rank order [Q_0 K_0 V_0 Q_1 K_1 V_1] -> [Q K V]
            y = gather_tensor_along_dim(y.chunk(get_tensor_model_parallel_world_size(), -1), -1,
                                        self.stride)
        return y

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"per_partition={self.output_size_per_partition}, stride={self.stride}, "
                f"gather_output={self.gather_output}, bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's input columns split over TP ranks: weight [output_size, input_size / tp].

    forward: x [..., input_size / tp] (input_is_parallel) or [..., input_size] (split here) ->
    [..., output_size] on every TP rank. The bias is replicated and added once, after the all-reduce.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True, init_method: InitMethod | None = None,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        _check_divisible("RowParallelLinear", "input_size", input_size, world)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size // world
        self.input_is_parallel = input_is_parallel
        device = _device(device)
        self.weight = _partitioned_weight((output_size, input_size), 1, 1, init_method,
                                          params_dtype, device)
        if bias:
            self.bias = _zero_bias(output_size, False, 1, params_dtype, device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)      # [..., input_size / tp]
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))  # [..., output_size]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"per_partition={self.input_size_per_partition}, "
                f"input_is_parallel={self.input_is_parallel}, bias={self.bias is not None}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: rank r holds rows [vocab_start_index, vocab_end_index).

    forward: ids [...] -> [..., embedding_dim]. Each rank looks up the ids it owns, zeroes the others,
    and an all-reduce assembles the full embeddings.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod | None = None,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        world, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        _check_divisible("VocabParallelEmbedding", "num_embeddings", num_embeddings, world)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_partition = num_embeddings // world
        self.vocab_start_index = rank * per_partition
        self.vocab_end_index = self.vocab_start_index + per_partition
        self.weight = _partitioned_weight((num_embeddings, embedding_dim), 0, 1, init_method,
                                          params_dtype, _device(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        foreign = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local_ids = (ids - self.vocab_start_index).masked_fill(foreign, 0)
        y = F.embedding(local_ids, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(y)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"rows=[{self.vocab_start_index}, {self.vocab_end_index})")
