"""bench/run.py: benchmark results are recorded in bench/results.json and docs/benchmarks.md is rendered from it."""

import importlib.util
import json
import sys

from helpers import REPO

spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench_run = importlib.util.module_from_spec(spec)
sys.modules["bench_run"] = bench_run   # its dataclasses look their module up there
spec.loader.exec_module(bench_run)


def test_last_lines_parse_and_goals_are_checked():
    values = bench_run.parse("kills=20 resumed=20 identical=true plan_max_rel_error=0.137 mode=sampled")
    assert values == {"kills": 20, "resumed": 20, "identical": True, "plan_max_rel_error": 0.137, "mode": "sampled"}
    assert bench_run.meets("kills >= 20 and identical == True", values) is True
    assert bench_run.meets("kills >= 21 and identical == True", values) is False
    assert bench_run.meets("missing_key <= 1", values) is None   # a line without the value: not judged
    assert bench_run.meets(None, values) is None
    study = bench_run.parse("best_kd_val_loss=4.2138 ce_val_loss=4.2481 kd_sd=0.0045 ce_sd=0.0034 seeds=3")
    assert bench_run.meets("ce_val_loss - best_kd_val_loss > max(kd_sd, ce_sd)", study) is True


def test_every_benchmark_script_is_run_and_every_recorded_result_is_a_benchmark():
    scripts = {path.stem for path in (REPO / "bench").glob("*.py")} - {"run", "common"}   # common: their helpers
    assert scripts == {benchmark.script for benchmark in bench_run.BENCHMARKS}
    results = json.loads((REPO / "bench" / "results.json").read_text())
    assert set(results) <= {benchmark.name for benchmark in bench_run.BENCHMARKS}
    for entry in results.values():
        assert "=" in entry["line"] and entry["date"] and entry["machine"]


def test_the_page_is_rendered_from_the_results():
    """docs/benchmarks.md is what bench/run.py renders from bench/results.json (rerun
    `python bench/run.py --render` after editing results by hand)."""
    page = (REPO / "docs" / "benchmarks.md").read_text()
    assert page == bench_run.render(bench_run.load())
    assert page.count("\n| `bench/") == len(bench_run.BENCHMARKS)


def test_a_recorded_run_replaces_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench_run, "PAGE", tmp_path / "benchmarks.md")
    monkeypatch.setattr(bench_run, "run", lambda benchmark, quick: (0, "peak_rss_ratio=1.400", 3.0))
    assert bench_run.main(["--only", "import_memory"]) == 0
    recorded = json.loads((tmp_path / "results.json").read_text())["import_memory"]
    assert recorded["line"] == "peak_rss_ratio=1.400" and recorded["recorded"] == "make bench"
    assert "| `peak_rss_ratio=1.400` |" in (tmp_path / "benchmarks.md").read_text()
    assert "**missed**" in (tmp_path / "benchmarks.md").read_text()
    monkeypatch.setattr(bench_run, "run", lambda benchmark, quick: (1, "Traceback", 3.0))
    assert bench_run.main(["--only", "import_memory", "--quick"]) == 1
