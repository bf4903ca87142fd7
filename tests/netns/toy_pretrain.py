"""A stand-in for pretrain.py in the launcher tests: same flags, same loss line, seconds to run.

It joins the process group the launcher describes (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from
deepspeed's launch or torchrun, or OMPI_COMM_WORLD_* under mpirun) with the distributed timeout the
launcher exports, then fits a linear model by data-parallel SGD with gradients all-reduced by hand.
Each iteration draws one global batch from (--seed, iteration); rank r trains on rows
[r*B, (r+1)*B) with B = --micro-batch-size, so the printed losses depend only on the global batch:
2 nodes x 1 process must print exactly what 1 node x 2 processes prints.

Rank 0 prints `iteration N/M | loss X.XXXXXX` every --log-interval iterations, like pretrain.py.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from megatron_t2i.arguments import parse_args  # noqa: E402

FEATURES = 16


def rank_environment():
    """OpenMPI names ranks its own way (deepspeed's MPI discovery does the same mapping)."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
        os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
        os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]


def global_batch(seed, iteration, rows):
    """The whole batch of one iteration: inputs [rows, FEATURES] and targets [rows]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    x = torch.randn(rows, FEATURES, generator=g)
    true_w = torch.linspace(-1.0, 1.0, FEATURES)
    y = x @ true_w + 0.1 * torch.randn(rows, generator=g)
    return x, y


def main():
    args = parse_args(groups=("model", "data", "training", "distributed"),
                      description="stand-in for pretrain.py in the launcher tests")
    torch.set_num_threads(1)
    rank_environment()
    minutes = float(os.environ.get("MEGATRON_T2I_DIST_TIMEOUT_MINUTES", "10"))
    dist.init_process_group(args.distributed_backend or "gloo", timeout=timedelta(minutes=minutes))
    rank, world = dist.get_rank(), dist.get_world_size()

    w = torch.zeros(FEATURES, requires_grad=True)  # [FEATURES]
    b = args.micro_batch_size
    for iteration in range(1, args.train_iters + 1):
        x, y = global_batch(args.seed, iteration, b * world)
        x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]  # this rank's rows
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            # The mean over the global batch: every rank has the same number of rows.
            dist.all_reduce(w.grad)
            w -= args.lr * w.grad / world
            w.grad.zero_()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
        if rank == 0 and (iteration % args.log_interval == 0 or iteration == args.train_iters):
            print(f"iteration {iteration}/{args.train_iters} | loss {mean_loss.item():.6f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
