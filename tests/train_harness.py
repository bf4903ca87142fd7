"""Run pretrain.py with a fault injected, for tests (never used by the product).

    MEGATRON_T2I_INJECT=overflow:3:1 torchrun ... tests/train_harness.py <pretrain.py flags>

    overflow:IT:RANK   the loss of iteration IT is inf on rank RANK only
    nan:IT             the loss of iteration IT is NaN on rank 0
    crash-save:IT      rank 0 dies (exit 137) half-way through writing the checkpoint of iteration IT
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pretrain  # noqa: E402
from megatron_t2i.training import loop  # noqa: E402

kind, *params = os.environ["MEGATRON_T2I_INJECT"].split(":")
state = {"iteration": 0}
rank = int(os.environ.get("RANK", "0"))

original_step = loop.Trainer.train_step


def train_step(self):
    state["iteration"] = self.iteration + 1
    return original_step(self)


loop.Trainer.train_step = train_step

original_forward_loss = loop.forward_loss


def forward_loss(*args, **kwargs):
    loss, parts = original_forward_loss(*args, **kwargs)
    if kind == "overflow" and state["iteration"] == int(params[0]) and rank == int(params[1]):
        loss = loss * float("inf")
    if kind == "nan" and state["iteration"] == int(params[0]) and rank == 0:
        loss = loss * float("nan")
    return loss, parts


loop.forward_loss = forward_loss

original_save = torch.save


def save(obj, f, *args, **kwargs):
    if (kind == "crash-save" and rank == 0 and isinstance(f, str) and f.endswith("model_states.pt")
            and state["iteration"] == int(params[0])):
        with open(f, "wb") as out:  # a torn write, then the process dies
            out.write(b"\x80\x02half a checkpoint")
        os._exit(137)
    return original_save(obj, f, *args, **kwargs)


torch.save = save

if __name__ == "__main__":
    sys.exit(pretrain.main())
