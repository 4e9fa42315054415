"""Artifacts on disk: atomic writes and replaces, manifests, content hashes and output locks.

Every stage writes into a temporary sibling folder (its staging folder) and writes its
``manifest.json`` there last: a folder with a manifest is complete. The staging folder then
replaces the output by renames only (:func:`replace_folder`), so a crash at any moment leaves a
complete result in place, aside or in staging, never a half one. A lock beside the output
(:func:`output_lock`) keeps a second run of the same stage out of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.core.errors import UserError
from pipelines.core.processes import alive

MANIFEST = "manifest.json"
REPLACED = ".replaced-"   # in the name of an old result kept aside: .<name>.replaced-<time>-<pid>


def sha256_file(path: Path, chunk_bytes: int = 16 << 20, sync: bool = False) -> str:
    """The file's sha256; ``sync``: also make its contents durable (fsync), for files another
    library wrote, hashed once they are complete."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
        if sync:
            os.fsync(handle.fileno())
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
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the renames and creations in ``folder`` durable (its directory entry)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:   # a file system that cannot sync a directory
        pass
    finally:
        os.close(descriptor)


def read_json(path: Path, key: str) -> Any:
    """A JSON file a user or a crash may have broken: invalid JSON is one error naming the file and
    ``key``, not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as error:   # JSONDecodeError, or bytes that are not text
        where = f" at line {error.lineno} column {error.colno}" if hasattr(error, "lineno") else ""
        raise UserError(f"{path} is not valid JSON{where} (torn by a crash, or edited)", key) from None


def read_manifest(folder: Path) -> dict | None:
    """A folder's manifest (None: the folder is not finished). A torn one names the folder: move
    it aside to redo the stage that wrote it."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return read_json(path, f"move {Path(folder)} aside to redo its stage")


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json(Path(folder) / MANIFEST, {**manifest, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def staging_path(final: Path) -> Path:
    """The temporary sibling a stage fills before renaming it to ``final`` (same on every rank)."""
    return final.with_name(f".{final.name}.incomplete")


def aside_path(final: Path) -> Path:
    """Where an old result goes when a new one replaces it: a hidden sibling, never a result's name."""
    return final.with_name(f".{final.name}{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def replace_folder(new: Path, final: Path, keep_old: bool = False) -> Path | None:
    """Put the complete folder ``new`` at ``final`` by renames: the old ``final`` aside, ``new`` in,
    then the old one removed, or kept (``keep_old``) and its path returned.

    Killed at any point, it leaves a complete result at ``final``, or none there and the new one
    still complete in ``new`` (the runner then finishes the rename) with the old one aside.
    ``PIPELINES_FAULT_REPLACE_PAUSE`` (seconds; ``bench/fault_injection.py`` sets it) holds that
    window open, so that a kill can be made to land inside it.
    """
    final, new = Path(final), Path(new)
    aside = None
    if final.exists():
        aside = aside_path(final)
        os.replace(final, aside)
        if os.environ.get("PIPELINES_FAULT_REPLACE_PAUSE"):
            time.sleep(float(os.environ["PIPELINES_FAULT_REPLACE_PAUSE"]))
    os.replace(new, final)
    fsync_folder(final.parent)
    if aside is not None and not keep_old:
        shutil.rmtree(aside)
        return None
    return aside


@contextmanager
def staged_folder(final: Path, is_main: bool = True, barrier=None, keep_old: bool = False,
                  kept: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; it replaces ``final`` (:func:`replace_folder`) when the block
    succeeds, and ``kept`` is called with the old result's folder when ``keep_old`` kept it.

    The staging folder is this code's own (its name is :func:`staging_path`'s): what an earlier
    crash left there is cleared first. ``barrier`` (for several ranks writing one folder) is called
    after clearing and before renaming; only the main rank touches the disk.
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
        aside = replace_folder(staging, final, keep_old)
        if aside is not None and kept is not None:
            kept(aside)


def replaced_folders(roots: list[Path]) -> list[Path]:
    """The old results kept aside under ``roots`` (``.<name>.replaced-<time>-<pid>``, holding a
    manifest or a stamp of this pipeline's): what ``make clean-replaced`` removes, and nothing else."""
    found = []
    for root in roots:
        if Path(root).is_dir():
            for path in sorted(Path(root).rglob(f".*{REPLACED}*")):
                if path.is_dir() and any((path / name).exists() for name in (MANIFEST, "inputs.json", "train")):
                    found.append(path)
    return found


def lock_path(folder: Path) -> Path:
    return Path(folder).with_name(f".{Path(folder).name}.lock")


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a run whose lock is unreadable"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _stale(other: dict, ours: dict) -> bool:
    if ours["slurm_job"] and other.get("slurm_job") == ours["slurm_job"]:
        return True
    return other.get("host") == ours["host"] and not alive(int(other.get("pid", 0)))


@contextmanager
def output_lock(folder: Path, key: str) -> Iterator[None]:
    """Hold ``folder``'s lock (``.<name>.lock`` beside it) while the block writes it.

    The lock is a file created with ``O_EXCL`` (atomic on local and network file systems alike),
    naming the host, pid and SLURM job that hold it. A lock is stale, and taken over, when its
    process is gone from this host, or when it names this process's own SLURM job (a requeued job
    keeps its id: the lock is its killed earlier run's, on whichever node that ran); any other is
    named in a :class:`UserError` for ``key``.
    """
    lock = lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder()
    for attempt in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
            except (OSError, ValueError):
                other = None
            if attempt == 0 and other and _stale(other, holder):
                try:   # stale: its process is gone; move it out of the way atomically, then retry
                    os.replace(lock, lock.with_name(f"{lock.name}.stale-{os.getpid()}"))
                    lock.with_name(f"{lock.name}.stale-{os.getpid()}").unlink()
                except FileNotFoundError:
                    pass
                continue
            raise UserError(f"{folder} is being written by another run ({_describe(other)}); wait for it to "
                            f"finish, or remove {lock} if that run is gone", key) from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump(holder, handle)
            handle.flush()
            os.fsync(handle.fileno())
        break
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == holder["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass
