"""Broadcast a batch from the first rank of each TP group to the rest of it.

Only TP rank 0 reads data; its TP peers receive the same batch (they compute slices of the same
model on the same tokens). Two broadcasts: the shapes (a fixed-size int64 tensor), then all tensors
flattened into one buffer of the shared dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_t2i.mpu.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                    get_tensor_model_parallel_src_rank,
                                    get_tensor_model_parallel_world_size)

_MAX_DIMS = 8


def _communication_device(device):
    if device is not None:
        return torch.device(device)
    if dist.get_backend(get_tensor_model_parallel_group()) == "nccl":  # NCCL moves CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check(keys, data, dtype) -> None:
    if data is None:
        raise ValueError("broadcast_data: the source rank (TP rank 0) must pass the data dict, got None")
    for key in keys:
        if key not in data:
            raise ValueError(f"broadcast_data: key {key!r} missing from data (has {sorted(data)})")
        if data[key].dtype != dtype:
            raise ValueError(f"broadcast_data: {key!r} has dtype {data[key].dtype}, expected {dtype}")
        if data[key].dim() > _MAX_DIMS:
            raise ValueError(f"broadcast_data: {key!r} has {data[key].dim()} dims, at most "
                             f"{_MAX_DIMS} supported")


def broadcast_data(keys: list[str], data: dict[str, torch.Tensor] | None, dtype: torch.dtype,
                   device=None) -> dict[str, torch.Tensor]:
    """{key: tensor} as held by TP rank 0, on every rank of its TP group (other ranks may pass None).

    Tensors come back on `device` (default: the current CUDA device under NCCL, else the CPU).
    """
    if not keys:
        return {}
    if get_tensor_model_parallel_world_size() == 1:
        _check(keys, data, dtype)
        return {key: data[key] if device is None else data[key].to(device) for key in keys}

    group, src = get_tensor_model_parallel_group(), get_tensor_model_parallel_src_rank()
    device = _communication_device(device)
    is_src = get_tensor_model_parallel_rank() == 0

    # shapes: row i = ndim of keys[i], then its sizes, zero-padded; ndim -1 = the source rejected it
    shapes = torch.zeros(len(keys) + 1, _MAX_DIMS + 1, dtype=torch.int64, device=device)
    error = None
    if is_src:
        try:
            _check(keys, data, dtype)
            for i, key in enumerate(keys):
                shapes[i, 0] = data[key].dim()
                shapes[i, 1:1 + data[key].dim()] = torch.tensor(data[key].shape, dtype=torch.int64)
        except ValueError as e:  # tell the peers before raising, or they would wait forever
            error, shapes[-1, 0] = e, -1
    dist.broadcast(shapes, src, group=group)
    if error is not None:
        raise error
    if shapes[-1, 0] == -1:
        raise ValueError(f"broadcast_data: the source rank {src} rejected the batch (see its error)")
    shapes = [tuple(row[1:1 + row[0]]) for row in shapes[:-1].tolist()]

    numels = [int(torch.Size(shape).numel()) for shape in shapes]
    if is_src:
        flat = torch.cat([data[key].to(device).reshape(-1) for key in keys])
    else:
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
    dist.broadcast(flat, src, group=group)
    return {key: part.view(shape)
            for key, part, shape in zip(keys, flat.split(numels), shapes)}
