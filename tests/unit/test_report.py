"""The report's statistics: standard errors, the at-chance mark, recovery only where measurable."""

import json
import random

import pytest
from helpers import compose

from pipelines import stages
from pipelines.evaluation import mmlu
from pipelines.evaluation.corpus_task import CHANCE
from pipelines.evaluation.recovery import macro_standard_error, mmlu_statistics


def results(folder, name, accuracy, per_subject, subjects=57, seed=0, val_loss=3.0):
    """An eval results.json whose questions are right with probability ``accuracy``."""
    rng = random.Random(seed)
    names = [f"subject_{i:02d}" for i in range(subjects) for _ in range(per_subject)]
    summary = mmlu.summarize(names, [rng.random() < accuracy for _ in names])
    (folder / "eval" / name).mkdir(parents=True)
    (folder / "eval" / name / "results.json").write_text(json.dumps(
        {"params": 1_000_000, "val_loss": val_loss, "mmlu": summary, "checkpoint": str(folder / name)}))
    return summary


def test_macro_standard_error_equals_the_binomial_one_for_equal_subjects():
    assert macro_standard_error(0.3, [20] * 57) == pytest.approx((0.3 * 0.7 / (20 * 57)) ** 0.5)
    # unequal subjects: small ones weigh as much as large ones in a macro average, so it is wider
    assert macro_standard_error(0.3, [2, 200]) > (0.3 * 0.7 / 202) ** 0.5


def test_the_standard_error_matches_the_spread_of_repeated_draws():
    rng = random.Random(0)
    draws = [mmlu.summarize([f"s{i}" for i in range(57) for _ in range(4)],
                            [rng.random() < 0.6 for _ in range(57 * 4)])["macro"] for _ in range(400)]
    mean = sum(draws) / len(draws)
    spread = (sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)) ** 0.5
    assert spread == pytest.approx(macro_standard_error(0.6, [4] * 57), rel=0.15)


def test_a_teacher_at_chance_makes_recovery_not_measurable(tmp_path):
    """The demo's case: every model near 0.25 on 114 questions (this teacher's draw is even below
    chance by more than two standard errors). No recovery percentage is claimed."""
    run = tmp_path / "run"
    for name, seed in (("teacher", 0), ("pruned_depth", 1), ("distilled_depth", 2)):
        results(run, name, CHANCE, per_subject=2, seed=seed)
    manifest = stages.run("report", compose("pipeline", [f"paths.runs={tmp_path}", "run.name=run"]))
    assert manifest["pruned_depth"]["mmlu_at_chance"] is True and manifest["recovery"] is None
    assert "not measurable at this size" in manifest["recovery_note"]
    text = (run / "report.md").read_text()
    assert "(at chance)" in text and "recovery not measurable" in text and "%" not in text.split("closed")[0]
    assert (run / "report.png").stat().st_size > 0


def test_a_teacher_above_chance_gets_recovery_with_its_error(tmp_path):
    run = tmp_path / "run"
    teacher = results(run, "teacher", 0.65, per_subject=20, seed=0)
    results(run, "pruned_depth", 0.30, per_subject=20, seed=1)
    distilled = results(run, "distilled_depth", 0.55, per_subject=20, seed=2)
    manifest = stages.run("report", compose("pipeline", [f"paths.runs={tmp_path}", "run.name=run"]))
    assert manifest["teacher"]["mmlu_at_chance"] is False and manifest["recovery_note"] is None
    assert manifest["recovery"] == pytest.approx(distilled["macro"] / teacher["macro"])
    assert 0.01 < manifest["recovery_se"] < 0.05  # about 0.85 · sqrt(0.015² + 0.014²)
    text = (run / "report.md").read_text()
    assert f"MMLU recovery {manifest['recovery']:.1%} ± {manifest['recovery_se']:.1%}" in text
    # the size-weighted score, which published numbers quote, is stated beside the macro column
    assert f"that score here: teacher {teacher['micro']:.4f}, pruned_depth " in text


def test_old_results_without_counts_still_get_an_error():
    stats = mmlu_statistics({"macro": 0.5, "micro": 0.5, "questions": 114, "subjects": {f"s{i}": 0.5 for i in range(57)}})
    assert stats["mmlu_se"] == pytest.approx(macro_standard_error(0.5, [2] * 57))
    assert stats["mmlu_at_chance"] is False  # 0.5 is far from 0.25 even on 114 questions


def test_the_report_lists_the_search_candidates(tmp_path):
    run = tmp_path / "run"
    results(run, "teacher", 0.65, per_subject=2, seed=0)
    (run / "prune_search").mkdir(parents=True)
    rows = [{"architecture": {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 104, "num_attention_heads": 4},
             "params": 226000, "params_modelopt": 228288, "exportable": True, "score": "val_loss", "val_loss": 4.0528,
             "chosen": True},
            {"architecture": {"num_layers": 4, "hidden_size": 52, "ffn_hidden_size": 128, "num_attention_heads": 4},
             "params": 225000, "params_modelopt": 226772, "exportable": True, "score": "val_loss", "val_loss": 4.1953,
             "chosen": False}]
    (run / "prune_search" / "prune_report.json").write_text(json.dumps({"target_params": 229779, "candidates": rows}))
    manifest = stages.run("report", compose("pipeline", [f"paths.runs={tmp_path}", "run.name=run"]))
    assert manifest["searches"]["search"]["candidates"] == rows
    text = (run / "report.md").read_text()
    assert "## Search: search (at most 229,779 parameters, val_loss)" in text
    assert "| 3 | 64 | 104 | 4 | 226,000 | 4.0528 | chosen |" in text
    assert "| 4 | 52 | 128 | 4 | 225,000 | 4.1953 |  |" in text


def test_the_report_lists_a_latency_search_and_plots_it(tmp_path):
    run = tmp_path / "run"
    results(run, "teacher", 0.65, per_subject=2, seed=0)
    (run / "prune_fast").mkdir(parents=True)

    def row(layers, ffn, ms, pruned, distilled, chosen, after_prune):
        return {"name": f"h64_f{ffn}_a4_l{layers}", "params": 1000 * ffn + layers,
                "architecture": {"num_layers": layers, "hidden_size": 64, "ffn_hidden_size": ffn,
                                 "num_attention_heads": 4},
                "latency_ms": ms, "latency_method": "parts", "memory_bytes": 2_000_000, "memory_format": "fp8",
                "val_loss_pruned": pruned, "val_loss_distilled": distilled, "distill_tokens": 8192,
                "chosen": chosen, "chosen_after_pruning": after_prune}

    rows = [row(3, 192, 1.25, 4.10, 3.95, False, True), row(3, 160, 1.20, 4.20, 3.90, True, False)]
    (run / "prune_fast" / "prune_report.json").write_text(json.dumps({
        "candidates": rows, "ranked_by": "val_loss_distilled",
        "targets": {"params": None, "latency_ms": 1.3, "memory_gb": None},
        "latency": {"method": "parts", "device": "cpu", "settings": {"batch": 1, "context": 64}, "max_error": 0.04,
                    "check": [{}, {}]},
        "memory": {"format": "fp8", "context": 4096, "batch": 1}}))
    stages.run("report", compose("pipeline", [f"paths.runs={tmp_path}", "run.name=run"]))
    text = (run / "report.md").read_text()
    assert "## Search: fast (decode in at most 1.3 ms; ranked by the loss after a short distillation)" in text
    assert "largest error on 2 whole-model timings: 4.0%" in text
    assert "| 3 | 64 | 160 | 4 | 160,003 | 1.200 | 0.002 | 4.2000 | 3.9000 | chosen |" in text
    assert "| 3 | 64 | 192 | 4 | 192,003 | 1.250 | 0.002 | 4.1000 | 3.9500 | best after pruning |" in text
    assert (run / "report_search.png").stat().st_size > 0


def test_quantized_rows_say_ptq_or_qad_and_what_each_cost():
    from pipelines.evaluation.recovery import quantization_lines

    made = {"quant_algo": "FP8", "group_size": None, "bytes": 2_000_000, "export_logit_drift": 0.01}
    report = {"students": ["depth", "depth_qad"],
              "distilled_depth": {"val_loss": 3.0, "corpus": 0.5},
              "distilled_depth_qad": {"val_loss": 3.1, "corpus": 0.5},
              "quantized_fp8_depth": {"val_loss": 3.2, "corpus": 0.45,
                                      "quantized": {**made, "student": "depth", "method": "PTQ"}},
              "quantized_fp8_depth_qad": {"val_loss": 3.15, "corpus": 0.5,
                                          "quantized": {**made, "student": "depth_qad", "method": "QAD"}}}
    rows = [line for line in quantization_lines(report) if line.startswith("| quantized_")]
    assert rows == ["| quantized_fp8_depth | FP8, PTQ | 2.00 MB | +0.2000 | -0.0500 | 1.0e-02 |",
                    "| quantized_fp8_depth_qad | FP8, QAD | 2.00 MB | +0.0500 | +0.0000 | 1.0e-02 |"]
    del report["quantized_fp8_depth"]["quantized"]["method"]   # a report made before QAD existed: PTQ
    assert "FP8, PTQ" in quantization_lines(report)[-2]


def test_an_answer_with_no_text_says_why():
    from pipelines.evaluation.recovery import generation_lines

    found = {"teacher": [{"prompt": "p", "text": " Yes,\n indeed", "tokens": 3}],
             "pruned": [{"prompt": "p", "text": "", "tokens": 0}],
             "student": [{"prompt": "p", "text": "  ", "tokens": 2}]}
    lines = generation_lines(found)
    assert "- *teacher*: Yes, indeed" in lines
    assert "- *pruned*: (none: its first token is end-of-text)" in lines
    assert "- *student*: (only whitespace or special tokens)" in lines
