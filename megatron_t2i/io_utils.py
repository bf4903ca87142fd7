"""Atomic file writes (a reader, or a crash, never sees a half-written file) and JSON reading.

Each writes a temporary file beside the target, flushes it to disk and renames it over the target
(rename is atomic within a file system).
"""
from __future__ import annotations

import json
import os


def write_bytes_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def read_json(path: str, what: str | None = None):
    """The JSON in `path`; a missing or malformed file is one line naming `what` (default: the
    path), e.g. `--deepspeed_config x.json: not valid JSON (...)`."""
    what = what or path
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        error = FileNotFoundError(f"{what}: no such file")
        error.path = path  # callers may name the missing file (setting .filename changes str())
        raise error from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from None


def dataclass_from_dict(cls, d: dict, source: str):
    """cls(**d), refusing unknown fields with one line naming `source`."""
    from dataclasses import fields

    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{source}: unknown fields {sorted(unknown)}")
    return cls(**d)
