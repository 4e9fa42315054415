"""A multiple-choice task small models pass, built from the corpus's held-out documents.

MMLU sits at chance (0.25) below roughly a billion parameters, so recovery measured on it is
noise for the demo and for small real models. This task is scored the way MMLU is (the most
likely of four continuations, by summed log-probability), but it asks what any language model
of the corpus learns: which continuation follows a passage.

Each question is a passage of ``context_tokens`` from a valid-split document, its true next
``continuation_tokens``, and three spans of the same length from other valid-split documents, in
a seeded random order. The valid split is chosen by document content (:func:`pipelines.data.corpus.is_valid`)
and distill and prune never read it, so no question comes from a training document. The
questions are a function of the tokenized data and the seed alone: every model of a run gets the
same ones.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipelines.core.errors import require

CHANCE = 0.25  # four choices, as MMLU's four answer letters


def at_chance(score: float, chance_se: float | None) -> bool:
    """Whether a four-choice score is within two standard errors (computed at chance) of chance."""
    return chance_se is None or abs(score - CHANCE) <= 2 * chance_se


def questions(data: Path, count: int, context_tokens: int, continuation_tokens: int,
              seed: int) -> list[tuple[list[int], list[list[int]], int]]:
    """``[(context ids, [four continuation ids], index of the true one)]``, ``count`` of them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = IndexedDataset(str(Path(data) / "valid"))
    need = context_tokens + continuation_tokens
    usable = [i for i in range(len(documents)) if len(documents[i]) >= need]
    require(len(usable) >= 4, f"the valid split of {data} has {len(usable)} documents of at least {need} "
            "tokens; the corpus task needs 4 (shorten eval.corpus.context_tokens)", "eval.corpus.context_tokens")
    rng = random.Random(seed)
    built = []
    for _ in range(count):
        source = rng.choice(usable)
        document = documents[source].tolist()
        cut = rng.randrange(context_tokens, len(document) - continuation_tokens + 1)
        true = document[cut:cut + continuation_tokens]
        distractors = []
        for other in rng.sample([i for i in usable if i != source], 3):
            text = documents[other].tolist()
            start = rng.randrange(0, len(text) - continuation_tokens + 1)
            distractors.append(text[start:start + continuation_tokens])
        answer = rng.randrange(4)
        built.append((document[cut - context_tokens:cut], distractors[:answer] + [true] + distractors[answer:],
                      answer))
    return built


def summarize(correct: list[bool]) -> dict:
    """Accuracy with its binomial standard error, and the at-chance mark (two errors at 0.25)."""
    n = len(correct)
    accuracy = sum(correct) / n if n else 0.0
    chance_se = (CHANCE * (1 - CHANCE) / n) ** 0.5 if n else None
    return {"accuracy": accuracy, "questions": n, "se": (accuracy * (1 - accuracy) / n) ** 0.5 if n else None,
            "chance_se": chance_se, "at_chance": at_chance(accuracy, chance_se)}
