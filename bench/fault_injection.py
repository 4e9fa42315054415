"""Kill the pipeline at random moments and resume it: the result must equal an uninterrupted run.

    .venv/bin/python bench/fault_injection.py              # >= 20 kills over the whole pipeline
    .venv/bin/python bench/fault_injection.py --quick      # >= 5 kills, logits and distill only (CI)

In a fresh temporary folder it runs the demo, shortened (``make pipeline`` as a user runs it:
``scripts/stage.py pipeline``), once without interruption. Then it runs the same command in a
second run folder and SIGKILLs its whole process group after a seeded random delay, reruns the
command, and so on until a run finishes; every rerun is what a user (or SLURM's requeue) does
after a crash. The delays are drawn between ``--min-delay`` and ``--max-delay`` seconds, so kills
land in start-up, computing, checkpoint writes and renames alike. Then it compares:

- every logits-cache shard, byte for byte;
- every checkpoint's weights (import, correction, pruned and distilled students), by their
  content digest (the weight files' bytes, :func:`pipelines.model.checkpoint.content_digest`);
- every eval result (MMLU accuracies and validation losses) and the report's numbers.

Two more faults, once each:

- a write that fails (the disk full, simulated by a file-size limit on the logits stage): the
  stage must fail with the OS's error (``named`` checks its text: a traceback, not yet a one-line
  error naming the file), and leave neither a manifest nor a checksum for the shard it could not
  write;
- a corrupted cache shard and a corrupted training checkpoint: each must be refused, named,
  before it is read.

Three more, on the finished faulty run:

- kills inside the replace window: a stage rerun with ``force=true`` is held between moving its
  old result aside and renaming its new one in (``PIPELINES_FAULT_REPLACE_PAUSE``) and killed
  there; the next plain run must put the finished result in place without computing it again,
  and every artifact must still equal the reference;
- the launcher killed alone (``kill -9`` of ``scripts/stage.py``, not its process group): the stage
  it started must die with it;
- two runs of one stage at once on one folder: one must be refused, naming the other's lock, and
  the other must finish.

Last line: ``kills=<n> resumed=<n> identical=<true|false> replace_kills=<n> concurrent=<refused|mixed>``
(goal: kills >= 20, identical true, replace_kills >= 5, concurrent refused).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The demo, shortened (every stage runs, in minutes on two cores) and checkpointing often, so
# that each resume has finished work to keep.
SHORT = ["correct.train_steps=60", "correct.eval_interval=30", "correct.save_interval=10",
         "distill.train_steps=40", "distill.eval_interval=20", "distill.save_interval=5",
         "prune.calib_samples=16", "prune.eval_samples=16", "eval.limit=1", "logits.samples_per_shard=16"]


def command(runs: Path, stages: str, extra: list[str]) -> list[str]:
    return [sys.executable, "scripts/stage.py", stages, "experiment=demo", "run.name=fault",
            f"paths.runs={runs}", "logits.reuse_from=null", *SHORT, *extra]


def run_to_end(runs: Path, stages: str, extra: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command(runs, stages, extra), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def _working(log: Path, offset: int) -> bool:
    """Whether the run has passed its skip checks: a line of new work since ``offset``."""
    with open(log, errors="replace") as handle:
        handle.seek(offset)
        for line in handle:
            if line.startswith("[") and not re.match(r"^\[\w+\] /", line) and "up to date" not in line:
                return True
    return False


def run_with_kills(runs: Path, stages: str, extra: list[str], rng: random.Random, low: float, high: float,
                   min_kills: int, log: Path) -> tuple[int, int]:
    """Kill and rerun, ``min_kills`` times, then let the last rerun end by itself (status 0).

    Each kill lands a random ``low``..``high`` seconds after the rerun shows new work (past the
    finished stages' skip checks, which cost a process start each), so every rerun gets a chance
    to progress and kills still land anywhere in a stage: start-up, compute, writes, renames."""
    kills = resumed = 0
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as output:
        while True:
            offset = log.stat().st_size
            process = subprocess.Popen(command(runs, stages, extra), cwd=REPO, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True, env=environment)
            while process.poll() is None and not _working(log, offset):
                time.sleep(0.05)
            delay = rng.uniform(low, high)
            try:  # enough kills: this rerun ends by itself
                status = process.wait(timeout=delay if kills < min_kills else None)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                resumed += 1
                print(f"  kill {kills}: {delay:.1f} s into new work", flush=True)
                continue
            if status != 0:
                raise SystemExit(f"a resumed run failed with status {status}; see {log}")
            if kills >= min_kills:
                return kills, resumed
            # finished before enough kills: the distilled students are removed and the remaining
            # kills land on their distillation from scratch, which must again end equal
            print(f"  finished after {kills} kills; distilling again from scratch", flush=True)
            for folder in (runs / "fault").glob("distill_*"):
                shutil.rmtree(folder)
            stages = "distill"


def artifacts(run: Path) -> dict:
    """What must be identical: shard bytes, weight digests, eval and report numbers."""
    from pipelines.core.artifacts import sha256_file
    from pipelines.model.checkpoint import content_digest

    found = {}
    logits = run / "logits"
    for shard in sorted(logits.glob("shard-*.bin")):
        found[f"logits/{shard.name}"] = sha256_file(shard)
    for model_yaml in sorted(run.glob("*/model.yaml")):
        if model_yaml.parent.name.startswith("."):   # old results kept aside (force=true)
            continue
        found[f"{model_yaml.parent.name}/weights"] = content_digest(model_yaml.parent)
    for exported in sorted(run.glob("export_*/*.safetensors")):
        found[f"{exported.parent.name}/{exported.name}"] = sha256_file(exported)
    for result in sorted(run.glob("eval/*/manifest.json")):
        manifest = json.loads(result.read_text())
        found[f"eval/{result.parent.name}"] = {k: manifest.get(k) for k in ("mmlu_macro", "mmlu_micro", "val_loss")}
    report = run / "report.json"
    if report.exists():
        found["report"] = json.loads(report.read_text()).get("models")
    return found


def disk_full(runs: Path) -> str:
    """The logits stage with a 64 KiB file-size limit: it must fail and leave nothing that looks done."""
    from pipelines.data.logits_cache import finished_shards

    folder = runs / "fault" / "logits"
    shutil.rmtree(folder, ignore_errors=True)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write raises instead of killing

    result = subprocess.run(command(runs, "logits", []), cwd=REPO, capture_output=True, text=True,
                            preexec_fn=limit)
    text = result.stdout + result.stderr
    named = "File too large" in text or "No space" in text
    complete_looking = (folder / "manifest.json").exists() or any(
        not (folder / f"shard-{i:05d}.bin").exists() for i in finished_shards(folder))
    return f"full_disk_failed={result.returncode != 0} named={named} complete_looking={complete_looking}"


def corruption(runs: Path) -> str:
    """Flip a byte of a training checkpoint, then of a cache shard; each must be refused by name."""
    run = runs / "fault"
    checkpoints = sorted((run / "distill_depth" / "train" / "checkpoints").glob("step-*"))
    _flip(next(iter(sorted(checkpoints[-1].glob("*.distcp")))))
    (run / "distill_depth" / "manifest.json").unlink()  # as if killed after the last save
    result = subprocess.run(command(runs, "distill", []), cwd=REPO, capture_output=True, text=True)
    checkpoint_named = result.returncode != 0 and "does not match its checksum" in result.stderr + result.stdout
    _flip(run / "logits" / "shard-00001.bin")
    result = subprocess.run(command(runs, "distill", ["force=true"]), cwd=REPO, capture_output=True, text=True)
    shard_named = result.returncode != 0 and "shard-00001.bin is corrupted" in result.stderr + result.stdout
    return f"corrupt_checkpoint_refused={checkpoint_named} corrupt_shard_refused={shard_named}"


# (stage spec, its output in the run) for the kills inside the replace window: each staged stage
# (stage, its output in the run) for the kills inside the replace window: the staged stages the
# run has (prepare is left out: its output is the repository's shared data folder)
REPLACED_STAGES = [("import", "import"), ("prune", "prune_depth"), ("prune", "prune_width"),
                   ("export", "export_depth"), ("export", "export_width")]


def replace_kills(runs: Path) -> tuple[int, list[str]]:
    """Rerun staged stages with force=true, kill each inside its replace window, rerun plainly."""
    kills, problems = 0, []
    run = runs / "fault"
    for stage, folder in REPLACED_STAGES:
        output = run / folder
        if not output.exists():   # --quick: no export
            continue
        extra = ["force=true"] + ([f"prune={folder.split('_')[1]}"] if stage in ("prune", "export") else [])
        env = {**os.environ, "PIPELINES_FAULT_REPLACE_PAUSE": "30"}
        process = subprocess.Popen(_one_stage(runs, stage, extra), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.time() + 600
        while process.poll() is None and time.time() < deadline and not any(
                output.parent.glob(f".{output.name}.replaced-*")):
            time.sleep(0.05)
        if process.poll() is not None:
            problems.append(f"{stage}: ended before its replace ({process.returncode})")
            continue
        time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        if output.exists():
            problems.append(f"{stage}: {output} still there after the kill: not inside the window")
        again = subprocess.run(_one_stage(runs, stage, extra[1:]), cwd=REPO, capture_output=True, text=True)
        if again.returncode != 0 or "the result an interrupted run finished is now in place" not in again.stdout:
            problems.append(f"{stage}: the rerun did not finish the replace: {again.stdout[-500:]}{again.stderr[-500:]}")
    return kills, problems


def _one_stage(runs: Path, stage: str, extra: list[str]) -> list[str]:
    """One stage's own script (no launcher between: the kill lands on the stage's process)."""
    return [sys.executable, f"scripts/{stage}.py", "experiment=demo", "run.name=fault", f"paths.runs={runs}",
            "logits.reuse_from=null", *SHORT, *extra]


def launcher_kill(runs: Path) -> bool:
    """``kill -9`` of the launcher alone, while the stage it started works: the stage must die too."""
    process = subprocess.Popen(command(runs, "correct", ["force=true", "correct.train_steps=100000"]), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = None
    deadline = time.time() + 300
    while child is None and time.time() < deadline and process.poll() is None:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        child = int(children[0]) if children else None
        time.sleep(0.1)
    time.sleep(5)                     # into its work
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for _ in range(100):
        if not Path(f"/proc/{child}").exists() or "zombie" in _state(child):
            return True
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


def concurrent(runs: Path) -> str:
    """Two runs of one stage at once on one output: one refused by the other's lock, one finished."""
    extra = ["force=true", "prune=width"]
    first = subprocess.Popen(_one_stage(runs, "prune", extra), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = runs / "fault" / ".prune_width.lock"
    deadline = time.time() + 300
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)              # the first holds the lock once it is past its skip check
    second = subprocess.run(_one_stage(runs, "prune", extra), cwd=REPO, capture_output=True, text=True)
    out, err = first.communicate()
    refused = second.returncode == 2 and "is being written by another run" in second.stderr
    return "refused" if refused and first.returncode == 0 else "mixed"


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="at least this many kills")
    parser.add_argument("--min-delay", type=float, default=0.5, help="seconds into new work")
    parser.add_argument("--max-delay", type=float, default=15.0, help="seconds into new work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5 kills, logits and distill only (CI)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fault_injection-") as temporary:
        root = Path(temporary)
        reference, faulty = root / "reference", root / "faulty"
        stages = "pipeline"
        if args.quick:
            args.kills = 5
            # the stages before logits once, copied to the second folder (logits and distill read
            # their inputs by path and by content); the kills land on logits + distill
            run_to_end(reference, "prepare,import,correct,prune", [])
            shutil.copytree(reference / "fault", faulty / "fault", symlinks=True)
            stages = "logits,distill"
        seconds = run_to_end(reference, stages, [])
        print(f"uninterrupted: {stages} in {seconds:.0f} s", flush=True)
        kills, resumed = run_with_kills(faulty, stages, [], rng, args.min_delay, args.max_delay,
                                        args.kills, root / "faulty.log")
        expected, got = artifacts(reference / "fault"), artifacts(faulty / "fault")
        differing = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        print(f"compared {len(expected)} artifacts; differing: {differing or 'none'}", flush=True)
        # the replace window on a copy of the finished run: the faults below break the run (a
        # corrupted checkpoint, a removed cache), and a replaced student would change their inputs
        window = root / "window"
        shutil.copytree(faulty, window, symlinks=True)
        faults = [corruption(faulty), disk_full(faulty)]
        for line in faults:
            print(line, flush=True)
        in_window, problems = replace_kills(window)
        after = artifacts(window / "fault")
        replaced = [key for key in expected if key.split("/")[0] in {folder for _, folder in REPLACED_STAGES}]
        changed = sorted(k for k in replaced if expected.get(k) != after.get(k))
        print(f"replace window: {in_window} kills; problems: {problems or 'none'}; differing after: "
              f"{changed or 'none'}", flush=True)
        identical = not differing and not changed and not problems and len(expected) > 0
        # last: these leave the faulty run changed (a correction restarted and killed; prune redone)
        together = concurrent(faulty)
        print(f"two runs of prune at once: {together}", flush=True)
        orphan_free = launcher_kill(faulty)
        print(f"launcher killed alone: its stage died too = {orphan_free}", flush=True)
    handled = all(p.endswith("True") for line in faults for p in line.split()
                  if p.split("=")[0] != "complete_looking") and "complete_looking=False" in faults[1]
    print(f"kills={kills} resumed={resumed} identical={str(identical).lower()} replace_kills={in_window} "
          f"concurrent={together}")
    if not (identical and handled and orphan_free and together == "refused"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
