"""How stages find each other: one folder per experiment, one sub-folder per stage.

``runs/<run.name>/`` holds ``import/`` (the teacher as imported), ``correct/`` (the corrected or
pre-trained teacher, optional), ``prune_<student>/``, ``logits/`` (shared by every student),
``distill_<student>/``, ``eval/<model>/``, ``export_<student>/`` and the report. A student is
named by its prune config (``prune=depth`` makes the ``depth`` student). Each stage's default
inputs are interpolations resolved here, from the manifests the earlier stages wrote, so
``make prune && make distill`` needs no paths typed.

The resolvers are registered when :mod:`pipelines` is imported:

- ``${teacher:RUN_DIR}``: ``correct/`` if a finished one exists, else ``import/``;
- ``${model_path:MODEL,RUN_DIR,STUDENT}``: ``teacher``, ``pruned``, ``distilled``, ``quantized_<format>`` or a path;
- ``${model_label:MODEL,STUDENT}``: the name results and the report use for it;
- ``${mul:A,B}``: A × B;
- ``${distill_reads:STEPS,BATCH,ROUNDS}``: the samples distillation reads, over every round.

Rounds (``run.rounds``): each entry is a round that prunes the previous round's distilled student
and distills it again, with its own ``prune``/``distill`` keys. Student ``s`` of round ``k`` is
``s_r<k>`` (folders ``prune_s_r<k>/``, ``distill_s_r<k>/``); round ``k`` distills on the samples
after those of the rounds before it, so rounds never see the same data twice.
:func:`student_runs` lists every student of every round with the overrides that make it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.core.errors import require

# the checkout this package runs from: its configs/ and scripts/
REPO = Path(__file__).resolve().parents[2]


def require_this_checkout(here: Path | None = None) -> None:
    """Stop when the command runs in another checkout of this project than the one Python imports
    ``pipelines`` from (two clones sharing one environment): it would run that one's code and
    write into that one's runs."""
    here = (here or Path.cwd()).resolve()
    other = (here / "pipelines" / "__init__.py").exists() and (here / "configs" / "pipeline.yaml").exists()
    require(here == REPO or not other, f"this is the checkout {here}, but Python imports pipelines from {REPO} "
            "(one environment shared by two clones): the command would run that code and write under "
            f"{REPO}; use this checkout's own environment (make setup here), or run from {REPO}",
            "the Python environment")

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
    if model.startswith("quantized_"):   # quantized_<format>: the quantize stage's export of the student
        return str(Path(run_dir) / f"quantize_{student}" / model[len("quantized_"):])
    return str(model)


def model_label(model: str, student: str) -> str:
    if model == "teacher":
        return "teacher"
    if model in ("pruned", "distilled"):
        return f"{model}_{student}"
    if model.startswith("quantized_"):
        return f"distilled_{student}_{model[len('quantized_'):]}"
    return Path(str(model)).name


# what a round may change, and what the rounds themselves set
ROUND_SECTIONS = ("prune", "distill")
ROUND_SET = ("prune.source", "prune.output", "prune.mode", "prune.budget_of", "distill.student",
             "distill.output", "distill.sample_offset")


@dataclass(frozen=True)
class StudentRun:
    """One student of one round: its folder name, its prune config and the overrides that make it."""

    name: str                 # run.student: the folders' suffix (prune_<name>/, distill_<name>/)
    prune: str                # the prune config (prune=<prune>)
    round: int                # 1, 2, ...; 0 without run.rounds
    overrides: tuple[str, ...]

    @property
    def previous(self) -> str | None:
        """The student this round prunes (``None`` for the first round: the teacher)."""
        return f"{self.prune}_r{self.round - 1}" if self.round > 1 else None


def rounds(cfg) -> list[dict]:
    """``run.rounds`` as plain dicts; checked: only ``prune``/``distill`` keys, none the rounds set."""
    value = cfg.run.get("rounds")
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else (value or [])
    require(isinstance(value, list) and all(isinstance(r, dict) for r in value), "run.rounds must be a list "
            "of mappings, e.g. [{prune: {target_params: 0.6}}, {prune: {target_params: 0.3}}]", "run.rounds")
    for number, entry in enumerate(value, 1):
        for section, keys in entry.items():
            require(section in ROUND_SECTIONS and isinstance(keys, dict), f"round {number} sets {section!r}; a round "
                    f"holds {' and '.join(ROUND_SECTIONS)} keys, e.g. {{prune: {{target_params: 0.3}}}}", "run.rounds")
            for key in _flatten(keys, section):
                require(key not in ROUND_SET, f"round {number} sets {key}, which the rounds set themselves "
                        "(each round prunes the previous round's distilled student)", "run.rounds")
    return value


def _flatten(tree: dict, prefix: str) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


def override_value(value) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[\w.\-/]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def student_runs(cfg) -> list[StudentRun]:
    """Every student of ``run.students``, in every round of ``run.rounds``, in the order they run."""
    students = [str(s) for s in cfg.run.students]
    require(students, "run.students is empty", "run.students")
    planned = rounds(cfg)
    if not planned:
        return [StudentRun(s, s, 0, (f"prune={s}",)) for s in students]
    run_dir = str(cfg.run.dir)
    runs = []
    for student in students:
        offset = 0
        for number, entry in enumerate(planned, 1):
            name = f"{student}_r{number}"
            overrides = [f"prune={student}", f"run.student={name}"]
            if number > 1:   # prune the previous round's student; a fractional budget stays the teacher's
                overrides += [f"prune.source={run_dir}/distill_{student}_r{number - 1}",
                              "prune.budget_of=${run.teacher}"]
            overrides += [f"{key}={override_value(value)}" for key, value in
                          _flatten(entry.get("prune") or {}, "prune").items()]
            overrides += [f"{key}={override_value(value)}" for key, value in
                          _flatten(entry.get("distill") or {}, "distill").items()]
            overrides.append(f"distill.sample_offset={offset}")
            offset += _round_reads(entry, int(cfg.distill.train_steps), int(cfg.distill.global_batch_size))
            runs.append(StudentRun(name, student, number, tuple(overrides)))
    return runs


def _round_reads(entry: dict, steps: int, batch: int) -> int:
    distill = entry.get("distill") or {}
    return int(distill.get("train_steps", steps)) * int(distill.get("global_batch_size", batch))


def distill_reads(steps, batch, planned) -> int:
    """The samples distillation reads: ``steps × batch``, or the sum over ``run.rounds``."""
    planned = OmegaConf.to_container(planned, resolve=True) if OmegaConf.is_config(planned) else planned
    if not planned:
        return int(steps) * int(batch)
    return sum(_round_reads(entry or {}, int(steps), int(batch)) for entry in planned)


def register_resolvers() -> None:
    resolvers = (("teacher", teacher), ("model_path", model_path), ("model_label", model_label),
                 ("mul", lambda a, b: int(a) * int(b)), ("distill_reads", distill_reads))
    for name, function in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
