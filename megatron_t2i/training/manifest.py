"""Checkpoint integrity: every save lists its files with their sizes and CRC-32 checksums.

    {save}/iter_0000100/manifest.json   {"format": ..., "files": {"mp_rank_00_model_states.pt":
                                         {"size": 123, "crc32": "89abcdef"}, ...}}

The manifest is written last, after the weights and JSONs, so it covers the model config and
token layout too: a checkpoint edited, cut short or damaged on disk after saving is found before
anything is loaded, and named in one line. It says nothing about whether a checkpoint can be
trusted (whoever can write the files can write the manifest): that is the safe loader's work
(megatron_t2i/safe_load.py). CRC-32 runs at about 3 GB/s here; ranks share the files to check.
"""
from __future__ import annotations

import os
import zlib

import torch.distributed as dist

from megatron_t2i.io_utils import read_json, write_json_atomic
from megatron_t2i.mpu.state import global_rank_world

MANIFEST = "manifest.json"
FORMAT = "megatron_t2i.checkpoint_manifest/1"
_BLOCK = 16 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files differ from its manifest; the message names the file."""


def file_entry(path: str) -> dict:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return {"size": os.path.getsize(path), "crc32": f"{crc:08x}"}


def list_files(folder: str) -> list[str]:
    """Paths relative to folder of every file below it but the manifest, sorted."""
    names = []
    for root, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(n for n in names if n != MANIFEST)


def _gather(obj) -> list:
    """Every rank's obj, on every rank (itself alone without torch.distributed)."""
    rank, world = global_rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def entries(folder: str, names: list[str], shared: bool = False) -> dict:
    """{name: file_entry} of names in folder; with shared, every rank of the process group
    checksums a share of them (collective) and all get the whole dict."""
    rank, world = global_rank_world() if shared else (0, 1)
    mine = {n: file_entry(os.path.join(folder, n)) for n in names[rank::world]}
    if world == 1:
        return mine
    merged = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def write_manifest(folder: str, known: dict | None = None) -> dict:
    """Write folder/manifest.json over every file in it; `known` entries (checksummed already,
    e.g. by all ranks right after saving) are taken as they are."""
    known = known or {}
    files = {n: known.get(n) or file_entry(os.path.join(folder, n)) for n in list_files(folder)}
    write_json_atomic(os.path.join(folder, MANIFEST), {"format": FORMAT, "files": files})
    return files


def read_manifest(folder: str) -> dict | None:
    """{name: entry} of folder's manifest; None for a checkpoint saved before manifests."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    data = read_json(path, f"checkpoint manifest {path}", expect=dict)
    if data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise DamagedCheckpoint(f"{path}: not a checkpoint manifest of format {FORMAT}")
    return data["files"]


def _problem(folder: str, name: str, want: dict) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{path}: missing (listed in {MANIFEST})"
    size = os.path.getsize(path)
    changed = size != want.get("size") or file_entry(path)["crc32"] != want.get("crc32")
    if changed and name.endswith(".json"):
        return (f"{path}: checksum differs from {MANIFEST}: edited after saving (the weights "
                f"were trained with the saved one; restore it)")
    if size != want.get("size"):
        return (f"{path}: {size} bytes, {want.get('size')} when saved: the file is incomplete or "
                f"was replaced (a copy cut short, a full disk)")
    if changed:
        return (f"{path}: checksum differs from {MANIFEST}: the file changed after it was saved "
                f"(damaged on disk or in transfer)")
    return None


def verify(folder: str, names: list[str] | None = None, shared: bool = False) -> bool:
    """Check names (default: every file the manifest lists) against the manifest; raises
    DamagedCheckpoint with one line naming the first bad file. With shared, the ranks split
    the work (collective; all raise alike). Returns False when there is no manifest (a
    checkpoint saved before them: nothing to check), True when verified."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    names = sorted(manifest) if names is None else names
    unlisted = [n for n in names if n not in manifest]
    rank, world = global_rank_world() if shared else (0, 1)
    problems = [_problem(folder, n, manifest[n]) for n in names[rank::world] if n in manifest]
    first = next((p for p in problems if p), None)
    if unlisted:
        first = first or f"{os.path.join(folder, unlisted[0])}: not listed in {MANIFEST}"
    found = [p for p in (_gather(first) if shared else [first]) if p]
    if found:
        raise DamagedCheckpoint(found[0])
    return True
