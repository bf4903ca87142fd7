"""Cross entropy over logits split by vocabulary across TP ranks, without gathering them.

Each rank holds logits [..., V/tp] for vocabulary rows [rank * V/tp, (rank + 1) * V/tp). The loss
    loss = log(sum_v exp(z_v - m)) - (z_target - m),   m = max_v z_v
needs only three all-reduces of per-token scalars: the max m, the target logit (found on exactly one
rank, zero elsewhere) and the sum of exponentials. The gradient is softmax(z) - onehot(target), which
each rank computes for its own slice. Computed in fp32 whatever the input dtype.

Targets must lie in [0, V); mask positions you do not want (padding) by multiplying the returned
per-token loss with a loss mask.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_t2i.mpu.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                    get_tensor_model_parallel_world_size)


def _all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_parallel, target):
        # logits_parallel [..., V/tp] (any float dtype), target [...] int64 global vocabulary ids
        logits = logits_parallel.float()
        logits_max = _all_reduce(logits.amax(dim=-1), dist.ReduceOp.MAX)         # [...]
        logits = logits - logits_max.unsqueeze(-1)  # new tensor: the input stays untouched

        per_partition = logits.size(-1)
        start = get_tensor_model_parallel_rank() * per_partition
        foreign = (target < start) | (target >= start + per_partition)          # [...]
        local_target = (target - start).masked_fill(foreign, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # [...]
        target_logit = _all_reduce(target_logit.masked_fill(foreign, 0.0))

        exp_logits = logits.exp_()  # in place: the shifted logits are no longer needed
        sum_exp = _all_reduce(exp_logits.sum(dim=-1))                            # [...]
        loss = sum_exp.log() - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))                         # [..., V/tp]
        ctx.save_for_backward(softmax, foreign, local_target)
        ctx.input_dtype = logits_parallel.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, foreign, local_target = ctx.saved_tensors
        # d loss / d z = softmax - onehot(target); the onehot lands on the rank that owns the target
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (foreign.float() - 1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None


def vocab_parallel_cross_entropy(logits_parallel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss [...] from this rank's logits [..., V/tp] and the global target ids [...]."""
    if logits_parallel.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits_parallel.shape)} do not "
                         f"match target {tuple(target.shape)} (expected logits [..., V/tp], target [...])")
    return _VocabParallelCrossEntropy.apply(logits_parallel, target)
