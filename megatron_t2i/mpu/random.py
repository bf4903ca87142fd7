"""Random streams for tensor parallelism, and activation checkpointing that replays them.

Two kinds of randomness:
- the default torch generator, seeded identically on every rank: weight initialisation and dropout on
  replicated activations (outside split regions) must agree across TP ranks;
- tracked streams, one seed per TP rank, entered with `get_rng_tracker().fork()`: dropout on split
  activations (attention probabilities of this rank's heads) must differ across TP ranks, or the
  model would drop the same units in every shard.

`fork` swaps a tracked state into the default generator and back. It swaps the CPU generator, and the
current CUDA device's generator only once CUDA is in use in this process, so a CPU run never touches
CUDA. `checkpoint` recomputes with the same default and tracked states, so dropout masks repeat.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.utils.checkpoint

from megatron_t2i.mpu.state import get_tensor_model_parallel_rank

MODEL_PARALLEL_RNG = "model-parallel"
_TP_SEED_OFFSET = 2718


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cuda_state_from_seed(seed: int) -> torch.Tensor:
    # the default CUDA generator is the only way to make a CUDA state; put the current one back after
    current = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(seed)
    state = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(current)
    return state


class RNGStatesTracker:
    """Named generator states: {name: {"seed": int, "cpu": state, "cuda": state or None}}."""

    def __init__(self):
        self._states: dict[str, dict] = {}

    def reset(self) -> None:
        self._states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"rng tracker: state {name!r} already exists")
        if any(s["seed"] == seed for s in self._states.values()):
            raise ValueError(f"rng tracker: seed {seed} is already used by another state")
        cpu = torch.Generator(device="cpu").manual_seed(seed).get_state()
        # the CUDA state is made lazily in fork() if CUDA is not in use yet
        self._states[name] = {"seed": seed, "cpu": cpu,
                              "cuda": _cuda_state_from_seed(seed) if _cuda_in_use() else None}

    def get_states(self) -> dict[str, dict]:
        """A copy of every state (tensors and ints only: loads with torch.load(weights_only=True))."""
        return {name: {key: value.clone() if isinstance(value, torch.Tensor) else value
                       for key, value in state.items()}
                for name, state in self._states.items()}

    def set_states(self, states: dict[str, dict]) -> None:
        self._states = {name: {key: value.clone() if isinstance(value, torch.Tensor) else value
                               for key, value in state.items()}
                        for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the body with the tracked stream `name` as the default generator, then switch back."""
        if name not in self._states:
            raise KeyError(f"rng tracker: no state named {name!r} (call model_parallel_seed first)")
        state = self._states[name]
        use_cuda = _cuda_in_use()
        if use_cuda and state["cuda"] is None:
            state["cuda"] = _cuda_state_from_seed(state["seed"])
        outer_cpu = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state() if use_cuda else None
        torch.set_rng_state(state["cpu"])
        if use_cuda:
            torch.cuda.set_rng_state(state["cuda"])
        try:
            yield
        finally:
            # keep where the tracked stream got to, and resume the default stream where it was
            state["cpu"] = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if use_cuda:
                state["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(outer_cuda)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Default generator(s) <- seed on every rank; tracked "model-parallel" <- seed + 2718 + tp_rank."""
    torch.manual_seed(seed)  # CPU and (lazily) every CUDA device
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + get_tensor_model_parallel_rank())


def checkpoint(function: Callable, *args):
    """function(*args) without keeping its activations; backward recomputes them.

    torch.utils.checkpoint replays the default CPU/CUDA generator states; the wrapper below replays the
    tracker's states too (and puts the tracker back after the recompute), so dropout inside and
    outside split regions draws the same masks in the recompute as in the forward.
    """
    forward_states = None

    def replaying(*inputs):
        nonlocal forward_states
        if forward_states is None:  # the forward pass: remember where the tracked streams were
            forward_states = _TRACKER.get_states()
            return function(*inputs)
        after_forward = _TRACKER.get_states()
        _TRACKER.set_states(forward_states)
        try:
            return function(*inputs)
        finally:
            _TRACKER.set_states(after_forward)

    return torch.utils.checkpoint.checkpoint(replaying, *args, use_reentrant=False)
