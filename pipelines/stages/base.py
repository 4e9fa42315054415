"""The stage contract: what a stage declares, and the one runner that does the rest.

A stage is a :class:`Stage` declared at the bottom of its module. It declares:

- ``checks(cfg, arch, layout)``: its rules on the config, an architecture and a parallel layout
  (``{"tensor", "pipeline", "context", "data"}``). :func:`pipelines.launch.preflight.check` calls them for
  the whole experiment before anything runs (with ``model.*`` and the planned layouts); the
  runner calls them again when the stage starts (with the checkpoint the stage reads and the
  layout it got), so each rule is written once;
- ``inputs(cfg)``: everything its result depends on. A folder whose manifest holds equal inputs
  is up to date;
- ``run(cfg, layout, folder, inputs)``: the work. It fills ``folder`` and returns the manifest's
  fields.

The runner, :func:`run`, owns, for every stage:

- skip when up to date, and ``force=true``;
- the folder. A staged stage fills a temporary sibling that is renamed into place. A resumable
  stage (:class:`Resume`: the logits shards, the training checkpoints) works in its output folder
  across crashes and requeues, stamped with its inputs so that work of other inputs is never
  mixed in;
- the manifest, written last: a folder with one is complete;
- the runtime: device, dtype and process groups come from the layout
  (:func:`pipelines.backend.distributed.initialize`), never from the stage.

The stage scripts (``scripts/<name>.py``) and the launcher find stages by name in :func:`registry`; the name is the make
target, the script (``scripts/<name>.py``), the config section and the run folder's prefix.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.core.artifacts import (
    aside_path,
    output_lock,
    read_manifest,
    replace_folder,
    staged_folder,
    staging_path,
    write_json,
    write_manifest,
)
from pipelines.core.errors import UserError
from pipelines.model import checkpoint

STAMP = "inputs.json"


@dataclass(frozen=True)
class Resume:
    """A stage whose partial work survives a restart, in its output folder.

    ``on_change``: what an unfinished folder stamped with other inputs gets: ``refuse`` (stop,
    naming what changed; ``force=true`` moves the old folder aside, never deleting it) or
    ``restart`` (clear it: recomputable work). ``grows``: inputs that may change while keeping the
    partial work (more samples of the same cache). ``finished(cfg, folder)``: run on the main
    process once the manifest is written, for what a complete folder no longer needs (the
    training state, unless kept); a crash before it leaves that state, never a half result.
    """

    on_change: str = "refuse"
    grows: tuple[str, ...] = ()
    stamp: str = STAMP      # where in the folder the stamp lives
    finished: Callable[[Any, Path], None] | None = None


def _parallel_runtime(cfg):
    return distributed.initialize(cfg.parallel)


@dataclass(frozen=True)
class Stage:
    name: str
    output: Callable[[Any], Path]
    inputs: Callable[[Any], dict | None]       # None: always runs, writes no manifest (the report)
    run: Callable[[Any, Any, Path, dict], dict]
    checks: Callable[[Any, dict | None, dict | None], None] | None = None
    source: Callable[[Any], Path] | None = None   # the checkpoint whose architecture checks() sees
    runtime: Callable[[Any], Any] | None = _parallel_runtime   # None: host only, no process group
    resume: Resume | None = None
    replaces: bool = True          # False: an output holding another result is refused, not replaced
    origin: Callable[[Any], Path] | None = None   # replaces=False: what it is made from (a newer one replaces)
    # for the launcher (pipelines.launch.main)
    per_student: bool = False      # runs once per run.students entry, with prune=<student>
    distributed: bool = False      # runs one process per GPU (torchrun / srun)
    model_parallel_only: bool = False   # as many processes as its model-parallel layout, no more
    each: Callable[[Any], list] | None = None   # one config per item (eval.model=all: every model)
    output_key: str | None = None  # the config key of its output, when not <name>.output

    @property
    def script(self) -> str:
        return f"scripts/{self.name}.py"

    @property
    def key(self) -> str:
        """The config key that names the output folder (what a user changes to move it)."""
        return self.output_key or f"{self.name}.output"


def layout_sizes(layout) -> dict | None:
    """The parallel sizes :attr:`Stage.checks` sees, from an initialized runtime layout."""
    if layout is None:
        return None
    return {"tensor": layout.tensor_parallel, "pipeline": layout.pipeline_parallel,
            "context": layout.context_parallel, "data": layout.data_parallel}


def run_all(stage: Stage, cfg) -> list[dict]:
    """What a stage script does: :func:`run` once, or once per item of ``stage.each``."""
    return [run(stage, one) for one in (stage.each(cfg) if stage.each else [cfg])]


def run(stage: Stage, cfg) -> dict:
    """Run ``stage`` on ``cfg`` unless its output is up to date; returns its manifest.

    Before any compute it refuses an output folder the stage did not write and an input inside
    the output (:func:`refuse_foreign`), finishes a replace that a crash interrupted, and takes the
    output's lock (:func:`pipelines.core.artifacts.output_lock`) for the rest of the run.
    """
    output, done = _finished(stage, cfg)
    inputs = stage.inputs(cfg)
    stamp = portable(inputs, cfg)
    force = bool(cfg.get("force", False))
    if not force and _same_inputs(done, inputs, stamp):
        print(skip_line(stage, output), flush=True)
        return done
    if inputs is None:   # writes named files into its output, replaces no folder (the report)
        return _run(stage, cfg, output, inputs, stamp, done, force)
    refuse_foreign(stage, output, cfg)
    main_process = distributed.launch_rank() == 0
    lock = output_lock(output, stage.key) if main_process else nullcontext()
    with lock:
        finished = _finish_interrupted_replace(stage, output, inputs, stamp, force, main_process)
        if finished is not None:
            return finished
        if not stage.replaces and not force:
            _refuse_other(stage, output, done, Path(str(stage.origin(cfg))).resolve() if stage.origin else None, cfg)
        return _run(stage, cfg, output, inputs, stamp, done, force)


def _run(stage: Stage, cfg, output: Path, inputs: dict | None, stamp, done: dict | None, force: bool) -> dict:
    layout = stage.runtime(cfg) if stage.runtime else None
    is_main = layout is None or layout.is_main
    barrier = _barrier if layout is not None else None
    if stage.checks:
        arch = None
        if stage.source:
            arch, _ = checkpoint.read_architecture(Path(str(stage.source(cfg))))
        stage.checks(cfg, arch, layout_sizes(layout))
    if inputs is None:
        return stage.run(cfg, layout, output, None)
    if stage.resume:
        _open_in_place(stage, output, stamp, inputs, done, force, is_main)
        if barrier:
            barrier()
        fields = stage.run(cfg, layout, output, inputs)
        manifest = _manifest(stage, stamp, fields, cfg)
        if is_main:
            write_manifest(output, manifest)
            if stage.resume.finished:
                stage.resume.finished(cfg, output)
    else:
        with staged_folder(output, is_main, barrier, keep_old=force,
                           kept=lambda aside: _say_kept(stage, aside)) as folder:
            fields = stage.run(cfg, layout, folder, inputs)
            manifest = _manifest(stage, stamp, fields, cfg)
            if is_main:
                write_manifest(folder, manifest)
    if barrier:
        barrier()
    return manifest


def _say_kept(stage: Stage, aside: Path) -> None:
    print(f"[{stage.name}] force=true: the previous result is kept in {aside} "
          "(make clean-replaced removes such folders)", flush=True)


def owns(stage: Stage, output: Path) -> bool:
    """Whether ``output`` is ``stage``'s to replace: absent, an empty folder, or a folder holding
    this stage's own manifest (or, for a resumable stage, its stamp)."""
    if not output.exists():
        return True
    if not output.is_dir():
        return False
    if not any(output.iterdir()):
        return True
    try:
        manifest = read_manifest(output)
    except UserError:   # a torn manifest of ours is still ours: it names this stage
        manifest = {"stage": stage.name} if f'"stage": "{stage.name}"' in (output / "manifest.json").read_text() else None
    if manifest is not None and manifest.get("stage") == stage.name:
        return True
    return stage.resume is not None and (output / stage.resume.stamp).exists()


def refuse_foreign(stage: Stage, output: Path, cfg) -> None:
    """Stop, naming the key, before a stage could remove what it did not write: an output folder
    that holds something else (whatever ``force`` says), or an input of its section inside it."""
    key = stage.key
    if not owns(stage, output):
        what = sorted(p.name for p in output.iterdir())[:4] if output.is_dir() else ["a file"]
        raise UserError(f"{key} {output} holds what the {stage.name} stage did not write "
                        f"({', '.join(what)}{', ...' if output.is_dir() and len(what) == 4 else ''}); it never "
                        "removes it, force=true included: choose another output folder, or move those files", key)
    real = output.resolve()
    for name, path in _section_paths(cfg, key.split(".")[0]):
        if path == real or real in path.parents:
            raise UserError(f"{name}: {path} is inside the output folder {output}, which the {stage.name} stage "
                            f"replaces: choose another {key}, or keep inputs elsewhere", key)


def _section_paths(cfg, section: str) -> list[tuple[str, Path]]:
    """The existing paths named by ``cfg[section]``'s keys (but its output), by key."""
    values = OmegaConf.select(cfg, section, default=None) if OmegaConf.is_config(cfg) else None
    if not OmegaConf.is_dict(values):
        return []
    found = []
    for name in values:
        if name == "output":
            continue
        value = OmegaConf.select(values, str(name), default=None, throw_on_resolution_failure=False)
        items = list(value) if OmegaConf.is_list(value) else [value]
        for item in items:
            if isinstance(item, str) and item and "://" not in item and Path(item).expanduser().exists():
                found.append((f"{section}.{name}", Path(item).expanduser().resolve()))
    return found


def _finish_interrupted_replace(stage: Stage, output: Path, inputs: dict, stamp, force: bool,
                                main_process: bool) -> dict | None:
    """A staging folder holding a complete result of these inputs is finished work that a crash
    kept from its rename: put it in place instead of computing it again."""
    staging = staging_path(output)
    if force or stage.resume is not None or not staging.is_dir():
        return None
    try:
        pending = read_manifest(staging)
    except UserError:   # torn: debris, which the staged run clears
        return None
    if not _same_inputs(pending, inputs, stamp):
        return None
    if main_process:
        replace_folder(staging, output)
        print(f"[{stage.name}] {output}: the result an interrupted run finished is now in place", flush=True)
    return pending


def up_to_date(stage: Stage, cfg) -> Path | None:
    """``stage``'s output folder when it is up to date for ``cfg`` (``force`` off), else None: the
    check :func:`run` makes first, for the launcher to make before it starts a process. An output
    without a manifest is settled before the inputs are read (import's hash every teacher file)."""
    output, done = _finished(stage, cfg)
    if done is None or bool(cfg.get("force", False)):
        return None
    inputs = stage.inputs(cfg)
    return output if _same_inputs(done, inputs, portable(inputs, cfg)) else None


def skip_line(stage: Stage, output: Path) -> str:
    return f"[{stage.name}] {output} is up to date; skipping (force=true reruns)"


def _finished(stage: Stage, cfg) -> tuple[Path, dict | None]:
    """The output folder and its manifest (None: not finished)."""
    output = Path(str(stage.output(cfg)))
    return output, read_manifest(output) if output.is_dir() else None


def _same_inputs(done: dict | None, inputs: dict | None, stamp: dict | None) -> bool:
    """Whether a finished output was made from these inputs: as stamped, or with the real paths as
    written before (a stage with no inputs always runs)."""
    return inputs is not None and done is not None and done.get("inputs") in (stamp, inputs)


def portable(inputs, cfg):
    """``inputs`` as stamped: a path inside the run folder reads ``${run.dir}/...``, one inside the
    runs folder ``${paths.runs}/...``, so a run copied or moved (``PIPELINES_RUNS``) stays up to
    date. The stage itself gets the real paths."""
    roots = []
    for key in ("run.dir", "paths.runs"):
        value = OmegaConf.select(cfg, key, default=None) if OmegaConf.is_config(cfg) else None
        if value:
            roots += [(os.path.abspath(str(value)), key), (os.path.realpath(str(value)), key)]

    def relocate(value):
        if isinstance(value, dict):
            return {k: relocate(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relocate(v) for v in value]
        if not isinstance(value, str) or "/" not in value or "://" in value:
            return value
        path = os.path.abspath(value)
        for root, key in roots:
            if path == root or path.startswith(root + os.sep):
                return "${" + key + "}" + path[len(root):]
        return value

    return relocate(inputs) if inputs is not None else None


def _barrier() -> None:
    torch.distributed.barrier()


def _manifest(stage: Stage, stamp: dict, fields: dict, cfg) -> dict:
    """What a finished output's manifest says: the stamp, then the stage's fields (a ``source``
    inside the runs folder named as the stamps name it, so that a moved run still knows it)."""
    manifest = {"stage": stage.name, "inputs": stamp, **fields}
    if isinstance(manifest.get("source"), str):
        manifest["source"] = portable(manifest["source"], cfg)
    return manifest


def _refuse_other(stage: Stage, output: Path, done: dict | None, origin: Path | None, cfg) -> None:
    """An output folder named by hand that holds something else is never replaced silently; a
    result made from the same ``origin`` (a student distilled again; in a moved run too) is replaced."""
    key = f"{stage.name}.output"
    if done is not None and origin is not None and done.get("source") in (str(origin), portable(str(origin), cfg)):
        print(f"[{stage.name}] {output} holds an older result made from {origin}; replacing it", flush=True)
        return
    if done is not None:
        raise UserError(f"output folder {output} already holds a different {stage.name} result (made "
                        f"from {done.get('source')}); choose another output, or force=true to replace it", key)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output folder {output} exists and holds no {stage.name} result; choose "
                        "another or remove it", key)


def changed_inputs(previous: dict, current: dict) -> list[str]:
    """Names of what differs between two stamps: ``settings`` by key, other inputs by name."""
    changed = [key for key in current if key != "settings" and previous.get(key) != current.get(key)]
    old, new = previous.get("settings") or {}, current.get("settings") or {}
    changed += [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return changed


def _open_in_place(stage: Stage, output: Path, inputs: dict, real: dict, done: dict | None, force: bool,
                   is_main: bool) -> None:
    """Make ``output`` hold only partial work of these ``inputs`` (:func:`portable`; a stamp of the
    ``real`` paths, as written before, counts as theirs); stamp it (main rank writes).

    Every rank reads the same stamp and reaches the same decision, so a refusal stops them all.
    """
    policy = stage.resume

    def kept(values: dict) -> dict:
        return {key: value for key, value in values.items() if key not in policy.grows}

    stamp = kept(inputs)
    path = output / policy.stamp
    previous = json.loads(path.read_text()) if path.exists() else None
    if previous == kept(real):
        previous = stamp
    stale = output.exists() and (force or (previous is not None and previous != stamp))
    if previous is not None and previous != stamp and done is None and not force and policy.on_change == "refuse":
        changed = changed_inputs(previous, stamp)
        settings = stamp.get("settings") or {}
        key = next((f"{stage.name}.{name}" for name in changed if name in settings), "FORCE")
        raise UserError(f"the unfinished {stage.name} state in {output} was written with other inputs "
                        f"({', '.join(changed)} changed); put them back to resume it, or rerun with "
                        "force=true (FORCE=1) to start over: the old state is moved aside, not deleted", key)
    if not is_main:
        return
    if stale and (policy.on_change == "refuse" or force):  # a finished run redone, or force: keep it
        aside = aside_path(output)
        os.replace(output, aside)
        print(f"[{stage.name}] the previous state is kept in {aside} (make clean-replaced removes such folders)",
              flush=True)
    elif stale:   # recomputable partial work of other inputs, in a folder of this stage's own
        shutil.rmtree(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    (output / "manifest.json").unlink(missing_ok=True)
    write_json(path, stamp)
