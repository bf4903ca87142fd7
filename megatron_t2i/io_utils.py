"""Atomic file writes (a reader, or a crash, never sees a half-written file) and JSON reading.

Each writes a temporary file beside the target, flushes it to disk and renames it over the target
(rename is atomic within a file system).
"""
from __future__ import annotations

import json
import os
import shutil


def ordinary_mode(base: int = 0o666) -> int:
    """The mode open() or mkdir() would give under the process's umask (0o644 / 0o755 under
    022): temporary files and folders start private (0o600 / 0o700), what users get back must
    not."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def write_bytes_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_torch_atomic(path: str, obj) -> None:
    """torch.save(obj) to path, atomically (readable with weights_only=True if obj holds tensors
    and plain data only)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


_JSON_TYPES = {dict: "object {...}", list: "list [...]", str: "string", int: "number",
               float: "number", bool: "true/false", type(None): "null"}


def replace_folder(partial: str, final: str) -> None:
    """Rename the finished folder `partial` to `final`. An older `final` (saving the same
    checkpoint or data set again) is moved aside first and removed only after the swap."""
    if os.path.isdir(final):
        old = f"{final}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(partial, final)
        shutil.rmtree(old)
    else:
        os.rename(partial, final)


def read_json(path: str, what: str | None = None, expect: type | None = None):
    """The JSON in `path`; a missing or malformed file, or one whose top level is not of type
    `expect` (dict or list), is one line naming `what` (default: the path), e.g.
    `--deepspeed_config x.json: not valid JSON (...)`."""
    what = what or path
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        error = FileNotFoundError(f"{what}: no such file")
        error.path = path  # callers may name the missing file (setting .filename changes str())
        raise error from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(data, expect):
        raise ValueError(f"{what}: expected a JSON {_JSON_TYPES[expect]}, found a JSON "
                         f"{_JSON_TYPES.get(type(data), type(data).__name__)}")
    return data


def dataclass_from_dict(cls, d: dict, source: str):
    """cls(**d), refusing unknown fields and values cls rejects with one line naming `source`."""
    from dataclasses import fields

    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{source}: unknown fields {sorted(unknown)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
