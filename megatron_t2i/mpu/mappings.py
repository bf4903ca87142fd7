"""Autograd-aware communication at the borders of tensor-parallel regions.

Inside a TP region each rank holds a slice of the activations; outside, every rank holds the same
full tensor. Each op below is the adjoint of another, so the backward pass does the mirror image of the
forward:

    copy_to     fwd identity        bwd all-reduce   (enter a region: every rank's slice needs x)
    reduce_from fwd all-reduce      bwd identity     (leave a region by summing partial results)
    scatter_to  fwd split last dim  bwd gather
    gather_from fwd gather last dim bwd split

With a TP world of 1 (or no torch.distributed at all) every op returns its input unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_t2i.mpu.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                    get_tensor_model_parallel_world_size)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    # on a fresh contiguous copy: the caller's tensor (maybe saved for another backward) stays intact
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_model_parallel_world_size()
    if x.size(-1) % world:
        raise ValueError(f"tensor parallel split: last dimension {x.size(-1)} is not divisible by "
                         f"the tensor parallel size {world}")
    return x.chunk(world, dim=-1)[get_tensor_model_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    shards = [torch.empty_like(x) for _ in range(get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, x, group=get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def _apply(fn, x: torch.Tensor) -> torch.Tensor:
    return x if get_tensor_model_parallel_world_size() == 1 else fn.apply(x)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _apply(_CopyToRegion, x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _apply(_ReduceFromRegion, x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> this rank's [..., n / tp] (contiguous chunks in rank order)."""
    return _apply(_ScatterToRegion, x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., n / tp] on each rank -> [..., n], the ranks' chunks concatenated in rank order."""
    return _apply(_GatherFromRegion, x)
