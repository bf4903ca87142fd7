"""Atomic file writes: a reader (or a crash) never sees a half-written file.

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


def dataclass_from_dict(cls, d: dict, source: str):
    """cls(**d), refusing unknown fields with one line naming `source`."""
    from dataclasses import fields

    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{source}: unknown fields {sorted(unknown)}")
    return cls(**d)
