"""SLURM: one ``sbatch`` job per stage, chained with ``--dependency=afterok``.

Each job's steps ``srun`` one task per GPU (the runtime reads SLURM's environment). Jobs ask for
``--signal=B:USR1@<cluster.signal_seconds>`` and ``--requeue``: the batch script forwards USR1 to
the running step, the stage checkpoints and exits with status 75
(:mod:`pipelines.training.preemption`), and the script requeues the job.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from pipelines.core.errors import UserError, require
from pipelines.core.experiment import REPO
from pipelines.launch.plan import invocations, python_executable, stage_processes
from pipelines.training.preemption import REQUEUE_EXIT

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
    log_dir = directive_path(Path(str(cfg.run.dir)).resolve() / "slurm")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={c.job_prefix}-{cfg.run.name}-{stage.replace('@', '-r')}",
             f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={tasks}",
             f"#SBATCH --cpus-per-task={int(c.cpus_per_task)}", f"#SBATCH --time={c.time}",
             f"#SBATCH --output={log_dir}/%x-%j.out", "#SBATCH --open-mode=append",
             f"#SBATCH --signal=B:USR1@{int(c.signal_seconds)}", "#SBATCH --requeue"]
    if int(c.gpus_per_node) > 0:
        lines.append(f"#SBATCH --gpus-per-node={min(int(c.gpus_per_node), tasks)}")
    lines += cluster_directives(c)
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(REPO))}",
              "export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false",
              f"export PD_REQUEUE_MARKER={shlex.quote(str(log_dir))}/.requeue-$SLURM_JOB_ID",
              "rm -f \"$PD_REQUEUE_MARKER\""]
    lines += job_environment(c)
    container = container_flags(cfg)
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
              "    echo \"[slurm] requeueing job $SLURM_JOB_ID\"",
              "    # a failed requeue must not read as success: afterok dependents would start",
              "    scontrol requeue $SLURM_JOB_ID && exit 0",
              f"    echo \"[slurm] scontrol requeue failed; the job ends with status {REQUEUE_EXIT}\"; exit {REQUEUE_EXIT}",
              "  fi",
              "  [ $rc -eq 0 ] || exit $rc",
              "}",
              f"echo \"[slurm] {stage}: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST\""]
    for (name, one, extra), (step_nodes, step_tasks) in zip(steps, sizes):
        # SLURM >= 22.05 does not pass sbatch's --cpus-per-task on to srun: without it every rank of
        # a step may share one core with its batch prefetch thread
        srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={step_tasks}", f"--nodes={step_nodes}",
                f"--cpus-per-task={int(c.cpus_per_task)}", *container]
        for arguments in invocations(name, one, extra):
            lines.append("step " + shlex.join([*srun, python_executable(cfg), *arguments]))
    return "\n".join(lines) + "\n"


def directive_path(path: Path, key: str = "paths.runs") -> Path:
    """``path`` for an ``#SBATCH`` line, which is not a shell line: no quoting reaches sbatch
    intact everywhere, so a path with a space, a quote or a shell character is refused by name."""
    bad = sorted({c for c in str(path) if c.isspace() or c in "\"'`$;&|<>*?"})
    require(not bad, f"{path} holds {''.join(bad)!r}, which an #SBATCH line cannot carry: put the runs "
            "folder at a path without them", key)
    return path


def cluster_directives(c) -> list[str]:
    """The ``#SBATCH`` lines every job takes from ``cluster``: host memory, partition, account,
    QOS and the extra flags."""
    lines = [f"#SBATCH --mem={c.mem}"] if c.get("mem") is not None else []
    lines += [f"#SBATCH --{key}={c[key]}" for key in ("partition", "account", "qos") if c.get(key)]
    return lines + [f"#SBATCH {flag}" for flag in c.extra_sbatch or []]


def job_environment(c) -> list[str]:
    """The exports every job's script makes, ``cluster.env`` last (it may override them)."""
    return [# Megatron-LM refuses TP>1 on Hopper without it: one hardware queue keeps each layer's
            # tensor-parallel collectives in issue order ahead of the next GEMM
            "export CUDA_DEVICE_MAX_CONNECTIONS=1",
            # this checkout's code, whatever the environment (or the image) has installed as pipelines
            f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
            *(f"export {key}={shlex.quote(str(value))}" for key, value in (c.env or {}).items())]


def container_flags(cfg) -> list[str]:
    """pyxis's ``srun`` flags with ``cluster.container_image``: the image, the repository mounted at
    its own path (the batch script's paths, the run and data folders under it, mean the same inside)
    with ``cluster.container_mounts`` beside it, the repository as the working folder, and one named
    container that every step of the job reuses instead of unpacking the image again."""
    c = cfg.cluster
    if not c.get("container_image"):
        return []
    mounts = [m for m in str(c.get("container_mounts") or "").split(",") if m]
    if not any(m.split(":")[0].rstrip("/") == str(REPO) for m in mounts):
        mounts.insert(0, f"{REPO}:{REPO}")
    return [f"--container-image={c.container_image}", f"--container-mounts={','.join(mounts)}",
            f"--container-workdir={REPO}", f"--container-name={c.job_prefix}-{cfg.run.name}"]


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
