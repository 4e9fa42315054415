"""How stages find each other: one folder per experiment, one sub-folder per stage.

``runs/<run.name>/`` holds ``import/`` (the teacher as imported), ``correct/`` (the corrected or
pre-trained teacher, optional), ``prune_<student>/``, ``logits/`` (shared by every student),
``distill_<student>/``, ``eval/<model>/``, ``export_<student>/`` and the report. A student is
named by its prune config (``prune=depth`` makes the ``depth`` student). Each stage's default
inputs are interpolations resolved here, from the manifests the earlier stages wrote, so
``make prune && make distill`` needs no paths typed.

The resolvers are registered when :mod:`pipelines` is imported:

- ``${teacher:RUN_DIR}``: ``correct/`` if a finished one exists, else ``import/``;
- ``${model_path:MODEL,RUN_DIR,STUDENT}``: ``teacher``, ``pruned``, ``distilled`` or a path;
- ``${model_label:MODEL,STUDENT}``: the name results and the report use for it;
- ``${mul:A,B}``: A × B (e.g. the samples distill reads: steps × global batch).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

MODELS = ("teacher", "pruned", "distilled")


def _finished(folder: Path) -> bool:
    return (folder / "manifest.json").exists()


def teacher(run_dir: str) -> str:
    run = Path(run_dir)
    return str(run / "correct") if _finished(run / "correct") else str(run / "import")


def model_path(model: str, run_dir: str, student: str) -> str:
    if model == "teacher":
        return teacher(run_dir)
    if model == "pruned":
        return str(Path(run_dir) / f"prune_{student}")
    if model == "distilled":
        return str(Path(run_dir) / f"distill_{student}")
    return str(model)


def model_label(model: str, student: str) -> str:
    if model == "teacher":
        return "teacher"
    if model in ("pruned", "distilled"):
        return f"{model}_{student}"
    return Path(str(model)).name


def register_resolvers() -> None:
    resolvers = (("teacher", teacher), ("model_path", model_path), ("model_label", model_label),
                 ("mul", lambda a, b: int(a) * int(b)))
    for name, function in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
