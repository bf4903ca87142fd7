"""The one loader of every torch file the project reads: weights only, never arbitrary code.

`torch.load(weights_only=False)` unpickles whatever a file says, and a pickle can run any code
(a `__reduce__` payload): a checkpoint folder from elsewhere is untrusted input. Every `.pt` the
project reads -- training resume and fine-tuning (through DeepSpeed), generation, conversion,
tokenizers, CLIP -- goes through `load_torch_file`, which allows tensors, plain containers and a
short list of inert classes. Anything else is refused with one line naming the file, before any
of it is unpickled.

DeepSpeed unpickles its own files with weights_only=False; `guarded_torch_load()` routes every
`torch.load` inside it through `load_torch_file` while DeepSpeed loads a checkpoint.

A file one trusts on purpose (e.g. an old CogView release that pickled numpy RNG states) loads
with trust=True (`--trust-checkpoint`), which prints a warning naming the file.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys

import torch


class UnsafeFileError(ValueError):
    """A file that the safe loader cannot or will not read; the message names it."""


def deepspeed_safe_globals() -> list:
    """The inert DeepSpeed objects pickled into its checkpoints (loss scaler, ZeRO stage enum,
    fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_original_torch_load = torch.load


def load_torch_file(path: str, trust: bool = False, allow=(), map_location="cpu"):
    """torch.load with weights_only=True (plus the `allow`ed classes); with trust=True full
    unpickling, announced on stderr. Any failure is one UnsafeFileError naming the file."""
    if not os.path.isfile(path):
        raise UnsafeFileError(f"{path}: missing")
    try:
        if trust:
            print(f"warning: {path}: fully unpickled (--trust-checkpoint): it can run any code",
                  file=sys.stderr, flush=True)
            return _original_torch_load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(allow)):
            return _original_torch_load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for a bad file; name the file
        message = str(e)
        # torch names the class or function it would have had to import (wording varies)
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", message)
        if refused:
            raise UnsafeFileError(
                f"{path}: refused by the safe loader (it pickles {refused[1]}, which could run "
                f"code); pass --trust-checkpoint only if you trust where it came from") from None
        first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        raise UnsafeFileError(f"{path}: not a readable torch file ({first[:300]})") from None


@contextlib.contextmanager
def guarded_torch_load(trust: bool = False, allow=()):
    """Inside: every torch.load(path, ...) -- DeepSpeed's included -- is load_torch_file(path)."""
    def load(f, map_location=None, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            raise UnsafeFileError("torch.load of an open file inside a guarded load")
        return load_torch_file(os.fspath(f), trust, allow, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _original_torch_load


class StateDictMismatch(ValueError):
    """A loaded state dict that does not fit the model; the message names the source and key."""


def check_state_dict(state: dict, expected: dict, source: str, model: str = "") -> None:
    """One line for the first missing or unexpected key, or wrong shape, of a loaded state dict
    against `expected` {key: tensor or shape}; `model` describes the model in the message."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in expected.items()}
    suffix = f" for a model of {model}" if model else ""
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    for keys, what in ((missing, "missing key"), (extra, "unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise StateDictMismatch(f"{source}: {what} {keys[0]}{more}{suffix}")
    for key, shape in shapes.items():
        got = state[key]
        if not torch.is_tensor(got) or tuple(got.shape) != shape:
            found = list(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise StateDictMismatch(f"{source}: {key} has shape {found}, expected "
                                    f"{list(shape)}{suffix}")
