"""Run stages here or submit them to SLURM (``scripts/stage.py``, behind every ``make`` target).

A stage (:class:`pipelines.stage.Stage`, by name) is one or more runs of ``scripts/<name>.py``:
per-student stages (``prune``, ``distill``, ``export``) run once per ``run.students`` entry with
``prune=<student>``, and once per round of ``run.rounds`` (``prune@2``: round 2 only; ``pipeline``
runs prune@1, logits, distill@1, prune@2, distill@2, ...; a bare ``prune`` runs the rounds whose
previous round is distilled and says which wait). Locally, stages that
use the parallel runtime run under ``torchrun`` when ``cluster.processes`` > 1. On SLURM
(``cluster=slurm``) each stage is one ``sbatch`` job whose steps ``srun`` one task per GPU (the
runtime reads SLURM's environment); ``pipeline`` submits every stage at once, chained with
``--dependency=afterok``. Run here, a stage whose every output is up to date
(:func:`pipelines.stage.up_to_date`) starts no process.

Preemption: jobs ask for ``--signal=B:USR1@<cluster.signal_seconds>`` and ``--requeue``. The
batch script forwards USR1 to the running step; the stage (see :mod:`pipelines.preemption`)
checkpoints, touches ``$PD_REQUEUE_MARKER`` and exits with status 75, and the script requeues
the job, which then skips the finished stages and resumes the interrupted one.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pipelines import experiment
from pipelines.errors import UserError, require
from pipelines.preemption import REQUEUE_EXIT
from pipelines.stage import Stage, get, registry

REPO = Path(__file__).resolve().parents[1]


def pipeline_stages(cfg) -> list[str]:
    """The stages ``make pipeline`` runs, in order (``correct`` only when enabled); with several
    rounds, each round's prune follows the previous round's distill (``prune@2``)."""
    stages = [s for s in registry() if s != "correct" or bool(cfg.correct.enabled)]
    count = len(experiment.rounds(cfg))
    if count < 2:
        return stages
    later = [f"{stage}@{number}" for number in range(2, count + 1) for stage in ("prune", "distill")]
    ordered = []
    for stage in stages:
        ordered += {"prune": ["prune@1"], "distill": ["distill@1", *later]}.get(stage, [stage])
    return ordered


def parse(spec: str) -> tuple[str, int | None]:
    """``prune@2`` -> ``("prune", 2)``; ``prune`` -> ``("prune", None)`` (every round)."""
    name, _, number = spec.partition("@")
    if not number:
        return name, None
    declared = get(name)
    require(declared.per_student and number.isdigit() and int(number) >= 1, f"{spec!r}: only per-student stages "
            "(prune, distill, export) take a round, as prune@2", "STAGE")
    return name, int(number)


def invocations(spec: str, cfg, overrides: list[str], quiet: bool = False) -> list[list[str]]:
    """Script argument lists of one stage: ``[script, override, ...]`` per invocation. A bare
    per-student stage with rounds leaves out the rounds whose previous round is not distilled."""
    stage, only = parse(spec)
    declared = get(stage)
    script = declared.script
    if not declared.per_student:
        return [[script, *overrides, *_parallel(cfg, stage)]]
    runs = experiment.student_runs(cfg)
    if only is not None:
        require(any(r.round == only for r in runs), f"{spec}: run.rounds has {max(r.round for r in runs)} "
                "rounds", "run.rounds")
        runs = [r for r in runs if r.round == only]
    kept = _without_prune(overrides)
    chosen = []
    run_dir = Path(str(cfg.run.dir))
    for student in runs:
        # a later round's input: the round before's distilled student, or this round's earlier stage
        needed = {"prune": f"distill_{student.previous}", "distill": f"prune_{student.name}",
                  "export": f"distill_{student.name}"}[stage]
        if only is None and student.previous and not (run_dir / needed / "manifest.json").exists():
            if not quiet:
                print(f"[{stage}] {student.name} waits for {run_dir / needed}: make {needed.split('_')[0]} first, "
                      "or make pipeline runs the rounds in order", flush=True)
            continue
        chosen.append([script, *kept, *_parallel(cfg, stage), *student.overrides])
    return chosen


def _without_prune(overrides: list[str]) -> list[str]:
    """The overrides less ``prune=...``: each student sets its own prune config."""
    return [o for o in overrides if not re.match(r"^\+?prune=", o)]


def _parallel(cfg, stage: str) -> list[str]:
    """``parallel.*`` overrides from ``run.stage_parallel.<stage>``."""
    from omegaconf import OmegaConf

    changes = OmegaConf.to_container(cfg.run.stage_parallel, resolve=True).get(stage) or {}
    return [f"parallel.{key}={value}" for key, value in changes.items()]


def _python(cfg) -> str:
    return str(cfg.cluster.get("python") or sys.executable)


def stage_processes(stage: str, cfg) -> tuple[int, int]:
    """``(nodes, processes per node)`` a stage runs with."""
    from pipelines.validate import processes, stage_parallel

    stage = parse(stage)[0]
    declared = get(stage)
    if not declared.distributed:
        return 1, 1
    if declared.model_parallel_only:
        layout = stage_parallel(cfg, stage)
        return 1, int(layout["tensor"]) * int(layout["pipeline"]) * int(layout.get("context", 1))
    if str(cfg.cluster.kind) == "slurm":
        return int(cfg.cluster.nodes), int(cfg.cluster.tasks_per_node)
    return 1, processes(cfg)


def run_local(stage: str, cfg, overrides: list[str]) -> None:
    _, processes = stage_processes(stage, cfg)
    declared = get(parse(stage)[0])
    for arguments in invocations(stage, cfg, overrides):
        if _up_to_date(declared, arguments[1:]):
            continue
        if declared.distributed and processes > 1:
            command = [_python(cfg), "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                       f"--master-port={_free_port()}", *arguments]
        else:
            command = [_python(cfg), *arguments]
        print(f"[{stage}] {shlex.join(command)}", flush=True)
        result = subprocess.run(command, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(result.returncode)


def _up_to_date(declared: Stage, overrides: list[str]) -> bool:
    """Whether every output of one invocation is up to date (:func:`pipelines.stage.up_to_date`,
    the check the stage makes first): then say so, as the stage would, and start no process (a
    Python, its imports and the runtime: seconds each). What this check cannot settle (a missing
    input, a bad value) is left to the stage, which reports it by its key."""
    from pipelines.stage import skip_line, up_to_date

    try:
        cfg = compose_pipeline(overrides)
        outputs = [up_to_date(declared, one) for one in (declared.each(cfg) if declared.each else [cfg])]
    except Exception:  # noqa: BLE001  (the stage runs, and reports it)
        return False
    if not all(outputs):
        return False
    for output in outputs:
        print(skip_line(declared, output), flush=True)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The rendezvous port of each step: one with no listener on this node (the batch script runs on
# the allocation's first node, where rank 0 listens). Bash alone, outside any container: two
# jobs sharing a node never derive the same port, as ``20000 + jobid % 20000`` could.
FREE_PORT = ("free_port() { local p; while :; do p=$((20000 + RANDOM % 40000)); "
             "(exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; return; }; done; }")


def sbatch_script(stage: str, cfg, overrides: list[str], steps: list[tuple] | None = None) -> str:
    """The batch script of one stage's job; ``steps``: ``[(stage, cfg, overrides), ...]`` when the
    job runs several (a sweep point's distill and eval), on as many processes as the largest needs."""
    c = cfg.cluster
    steps = steps or [(stage, cfg, overrides)]
    sizes = [stage_processes(name, one) for name, one, _ in steps]
    nodes, tasks = max(n for n, _ in sizes), max(t for _, t in sizes)
    log_dir = Path(str(cfg.run.dir)).resolve() / "slurm"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={c.job_prefix}-{cfg.run.name}-{stage.replace('@', '-r')}",
             f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={tasks}",
             f"#SBATCH --cpus-per-task={int(c.cpus_per_task)}", f"#SBATCH --time={c.time}",
             f"#SBATCH --output={log_dir}/%x-%j.out", "#SBATCH --open-mode=append",
             f"#SBATCH --signal=B:USR1@{int(c.signal_seconds)}", "#SBATCH --requeue"]
    if int(c.gpus_per_node) > 0:
        lines.append(f"#SBATCH --gpus-per-node={min(int(c.gpus_per_node), tasks)}")
    for key in ("partition", "account", "qos"):
        if c.get(key):
            lines.append(f"#SBATCH --{key}={c[key]}")
    lines += [f"#SBATCH {flag}" for flag in c.extra_sbatch or []]
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(REPO))}",
              "export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false",
              f"export PD_REQUEUE_MARKER={log_dir}/.requeue-$SLURM_JOB_ID",
              "rm -f \"$PD_REQUEUE_MARKER\""]
    lines += [f"export {key}={shlex.quote(str(value))}" for key, value in (c.env or {}).items()]
    container = []
    if c.get("container_image"):
        container.append(f"--container-image={c.container_image}")
        if c.get("container_mounts"):
            container.append(f"--container-mounts={c.container_mounts}")
    lines += ["",
              FREE_PORT,
              "# USR1 before the time limit: ask the running step to checkpoint and exit (status 75)",
              "child=0",
              "trap 'echo \"[slurm] USR1: checkpointing\"; [ $child -ne 0 ] && kill -USR1 $child' USR1",
              "step() {",
              "  export MASTER_PORT=$(free_port)",
              "  \"$@\" &",
              "  child=$!",
              "  local rc=0",
              "  wait $child || rc=$?",
              "  while kill -0 $child 2>/dev/null; do rc=0; wait $child || rc=$?; done",
              "  child=0",
              f"  if [ $rc -eq {REQUEUE_EXIT} ] || [ -e \"$PD_REQUEUE_MARKER\" ]; then",
              "    rm -f \"$PD_REQUEUE_MARKER\"",
              "    echo \"[slurm] requeueing job $SLURM_JOB_ID\"; scontrol requeue $SLURM_JOB_ID; exit 0",
              "  fi",
              "  [ $rc -eq 0 ] || exit $rc",
              "}",
              f"echo \"[slurm] {stage}: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST\""]
    for (name, one, extra), (step_nodes, step_tasks) in zip(steps, sizes):
        srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={step_tasks}", f"--nodes={step_nodes}",
                *container]
        for arguments in invocations(name, one, extra):
            lines.append("step " + shlex.join([*srun, _python(cfg), *arguments]))
    return "\n".join(lines) + "\n"


def submit(stages: list[str], cfg, overrides: list[str], dry_run: bool = False) -> list[str]:
    """Submit ``stages`` as jobs chained with ``afterok``; return the job ids (or scripts when dry)."""
    jobs = [(stage, sbatch_script(stage, cfg, overrides), [index - 1] if index else [])
            for index, stage in enumerate(stages)]
    return submit_jobs(jobs, cfg, dry_run)


def submit_jobs(jobs: list[tuple[str, str, list[int]]], cfg, dry_run: bool = False) -> list[str]:
    """Submit ``(name, batch script, indices of the jobs it waits for)`` in order, each after
    those it waits for (``afterok``); return the job ids (or ``<name>`` when dry)."""
    log_dir = Path(str(cfg.run.dir)) / "slurm"
    ids: list[str] = []
    for name, script, after in jobs:
        if dry_run:
            flags = f" --dependency=afterok:{':'.join(f'<{jobs[i][0]} job>' for i in after)}" if after else ""
            print(f"# ---- {name}: sbatch --parsable{flags} <<'EOF'")
            print(script + "EOF")
            ids.append(f"<{name}>")
            continue
        log_dir.mkdir(parents=True, exist_ok=True)
        command = ["sbatch", "--parsable"]
        if after:
            command.append(f"--dependency=afterok:{':'.join(ids[i] for i in after)}")
        result = subprocess.run(command, input=script, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"sbatch refused the {name} job: {result.stderr.strip()}", "cluster")
        ids.append(result.stdout.strip().split(";")[0])
        print(f"[slurm] {name}: job {ids[-1]}", flush=True)
    if not dry_run:
        record = log_dir / "jobs.json"
        previous = json.loads(record.read_text()) if record.exists() else []
        record.write_text(json.dumps(previous + [{name: i for (name, _, _), i in zip(jobs, ids)}], indent=2))
        print("[slurm] submitted " + " ".join(ids) + f"; logs in {log_dir}/")
    return ids


def compose_pipeline(overrides: list[str]):
    """``configs/pipeline.yaml`` with ``overrides``; a missing experiment or group option is one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            return compose("pipeline", overrides=overrides)
    except MissingConfigException as error:
        missing = str(getattr(error, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        options = ", ".join(getattr(error, "options", None) or [])
        key = "EXP (experiment=...)" if group == "experiment" else group or "the config overrides"
        raise UserError(f"no {group or 'config'} {name!r} in configs/{group}/; one of: {options}", key) from None
    except ConfigCompositionException as error:
        raise UserError(f"bad override: {str(error).splitlines()[0]}", "ARGS") from None


def check_students(cfg, names: list[str], overrides: list[str]) -> list[dict]:
    """Every student of every round, checked before any compute: its own config (``prune=<student>``
    and its round's keys) for the per-student stages and eval, with the source its round prunes:
    the round before's distilled student when it exists, else the shape planned for it (a search's
    largest within its budget; a budget only its smaller candidates meet warns instead). Returns what :func:`pipelines.validate.check` returned for each."""
    from pipelines import checkpoint, validate

    stages = [name for name in names if get(name).per_student or name == "eval"]
    kept = _without_prune(overrides)
    planned: dict[str, dict] = {}
    searched: dict[str, dict] = {}   # a searched student's smallest candidate
    checked = []
    for student in experiment.student_runs(cfg):
        try:
            one = compose_pipeline([*kept, *student.overrides])
        except UserError as error:
            key = "run.rounds" if student.round else error.key
            raise UserError(f"student {student.name}: {error.message}", key) from None
        source = planned.get(student.previous)
        made = Path(str(cfg.run.dir)) / f"distill_{student.previous}"
        if student.previous and (made / "manifest.json").exists():
            source = checkpoint.read_architecture(made)[0]
        try:
            checked.append(validate.check(one, stages, source=source))
        except UserError as error:
            smallest = searched.get(student.previous)
            if source is not planned.get(student.previous) or smallest is None:
                raise _in_round(student, error) from None
            # a search may choose any of its top_k candidates: refuse only if the smallest fails too
            try:
                checked.append(validate.check(one, stages, source=smallest))
            except UserError:
                raise _in_round(student, error) from None
            print(f"[check] {student.name}: {error.message}, if round {student.round - 1}'s "
                  "search chooses its largest candidate; it is checked again when that round is distilled",
                  flush=True)
        planned[student.name] = checked[-1]["student"]
        if str(one.prune.mode) == "search":
            from pipelines.search import within_budget

            candidates = within_budget(one, checked[-1]["source"])[:int(one.prune.search.top_k)]
            searched[student.name] = candidates[-1]
    return checked


def _in_round(student, error: UserError) -> UserError:
    """``error`` naming the round it is about (without rounds: as it is)."""
    if not student.round:
        return error
    what = f"round {student.round}" + (f", pruning {student.previous}" if student.previous else "")
    return UserError(f"student {student.name} ({what}): {error.message}", error.key)


def plan_sweep(overrides: list[str]):
    """``(run config, fixed overrides, shared stages, caches, points)`` of a sweep, every config
    checked: caches ``[(folder, config, overrides)]`` one per distinct setting, points
    ``[(point, config, overrides)]``."""
    from pipelines import sweep, validate

    fixed, axes = sweep.split(overrides)
    cfg = compose_pipeline(fixed)
    sweep.check(cfg, axes)
    points, caches = [], {}
    for point in sweep.points(axes, fixed):
        extra = sweep.base_overrides(cfg, point)
        try:
            one = compose_pipeline([*fixed, *extra])
        except UserError as error:
            raise UserError(f"sweep point {point.name}: {error.message}", error.key) from None
        cache = sweep.cache_folder(cfg, one)
        if cache is not None:
            extra.append(f"logits.output={cache}")
            one = compose_pipeline([*fixed, *extra])
            caches.setdefault(cache, (one, [*fixed, *extra]))
        points.append((point, one, [*fixed, *extra], cache))
    shared = [s for s in pipeline_stages(cfg) if s in sweep.SHARED_STAGES]
    names = shared + ["logits"] * bool(caches) + ["distill", "eval"]
    students = check_students(cfg, names, fixed)
    validate.check(cfg, [n for n in names if not get(n).per_student and n != "logits"], student=students[0]["student"])
    for point, one, extra, _ in points:
        try:
            check_students(one, ["distill", "eval"], extra)
        except UserError as error:
            raise UserError(f"sweep point {point.name}: {error.message}", error.key) from None
    for one, _ in caches.values():
        validate.check(one, ["logits"], student=students[0]["student"])
    return cfg, fixed, shared, [(folder, *value) for folder, value in caches.items()], points


def run_sweep(overrides: list[str], dry_run: bool) -> None:
    """``stage.py sweep [-m] key=a,b ...``: the shared stages once, each distinct cache once, then
    every point's distill and eval, then the report with the comparison (see :mod:`pipelines.sweep`)."""
    from pipelines import sweep

    cfg, fixed, shared, caches, points = plan_sweep(overrides)
    print(f"[sweep] {len(points)} points, {len(caches)} logits cache(s), under {Path(str(cfg.run.dir)) / 'sweep'}/",
          flush=True)
    for point, _, _, cache in points:
        sweep.write_point(cfg, point, cache)
    if str(cfg.cluster.kind) == "slurm":
        jobs = [(stage, sbatch_script(stage, cfg, fixed), [index - 1] if index else [])
                for index, stage in enumerate(shared)]
        # every job logs into the run's slurm/ (the one folder submit_jobs makes)
        for folder, one, extra in caches:
            jobs.append((folder.name, sbatch_script(folder.name, cfg, fixed, [("logits", one, extra)]),
                         [len(jobs) - 1] if jobs else []))
        ready = [len(jobs) - 1] if jobs else []
        first = len(jobs)
        for number, (point, one, extra, _) in enumerate(points):
            steps = [("distill", one, extra), ("eval", one, extra)]
            jobs.append((f"point-{number}", sbatch_script(f"point-{number}", cfg, fixed, steps), ready))
        jobs.append(("report", sbatch_script("report", cfg, fixed), list(range(first, len(jobs)))))
        submit_jobs(jobs, cfg, dry_run)
        return
    require(not dry_run, "--dry-run is for cluster=slurm", "cluster")
    for stage in shared:
        run_local(stage, cfg, fixed)
    for folder, one, extra in caches:
        run_local("logits", one, extra)
    for number, (point, one, extra, _) in enumerate(points, 1):
        print(f"[sweep] point {number}/{len(points)}: {point.name}", flush=True)
        run_local("distill", one, extra)
        run_local("eval", one, extra)
    run_local("report", cfg, fixed)


def runs_on_gpus(cfg) -> bool:
    """Whether the stages run on GPUs: a SLURM cluster with GPUs, or this machine when it has one."""
    if str(cfg.cluster.kind) == "slurm":
        return int(cfg.cluster.gpus_per_node) > 0
    import torch

    return torch.cuda.is_available()


def main(argv: list[str]) -> None:
    """``stage.py STAGE[,STAGE...]|pipeline [--dry-run] [hydra overrides]``."""
    from pipelines.cli import quiet_known_noise

    quiet_known_noise()
    usage = "usage: scripts/stage.py STAGE|pipeline [--dry-run] [key=value ...]"
    if not argv or argv[0].startswith("-"):
        raise UserError(usage, "STAGE")
    stage, rest = argv[0], argv[1:]
    dry_run = "--dry-run" in rest
    overrides = [a for a in rest if a != "--dry-run"]
    if stage == "sweep":
        run_sweep(overrides, dry_run)
        return
    cfg = compose_pipeline(overrides)
    stages = pipeline_stages(cfg) if stage == "pipeline" else stage.split(",")
    names = list(dict.fromkeys(parse(spec)[0] for spec in stages))  # an unknown name stops here
    from pipelines import validate

    students = check_students(cfg, names, overrides)
    checked = validate.check(cfg, [n for n in names if not get(n).per_student], student=students[0]["student"])
    checked["layouts"] = {**checked["layouts"], **students[0]["layouts"]}   # the memory plan's
    if runs_on_gpus(cfg):
        from pipelines import memory_plan

        estimates = memory_plan.plan(cfg, names, checked)
        if estimates:
            print(f"[memory] predicted peak per GPU (limit cluster.gpu_memory_gb="
                  f"{cfg.cluster.get('gpu_memory_gb') or 80}):", flush=True)
            for estimate in estimates:
                print(f"[memory]   {estimate.line()}", flush=True)
        memory_plan.check(cfg, estimates)
    if str(cfg.cluster.kind) == "slurm":
        submit(stages, cfg, overrides, dry_run)
        return
    require(not dry_run, "--dry-run is for cluster=slurm", "cluster")
    for name in stages:
        run_local(name, cfg, overrides)
