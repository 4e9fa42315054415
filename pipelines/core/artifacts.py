"""Artifacts on disk: atomic writes, manifests and content hashes.

Every stage writes into a temporary sibling folder and renames it into place, and writes its
``manifest.json`` last: a folder with a manifest is complete, anything else is debris from a crash
that the next run removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk_bytes: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def config_hash(obj: Any) -> str:
    """A stable short hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: temporary name, fsync, rename."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json(Path(folder) / MANIFEST, {**manifest, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def staging_path(final: Path) -> Path:
    """The temporary sibling a stage fills before renaming it to ``final`` (same on every rank)."""
    return final.with_name(f".{final.name}.incomplete")


@contextmanager
def staged_folder(final: Path, is_main: bool = True, barrier=None) -> Iterator[Path]:
    """Yield an empty staging folder; rename it to ``final`` when the block succeeds.

    Debris from an earlier crash is removed first. ``barrier`` (for several ranks writing one
    folder) is called after clearing and before renaming; only the main rank touches the disk.
    """
    final = Path(final)
    staging = staging_path(final)
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if barrier:
        barrier()
    yield staging
    if barrier:
        barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
