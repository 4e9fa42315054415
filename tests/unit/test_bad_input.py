"""Bad values, tried as a new user would: one line naming the key, exit 2, no traceback, no compute."""

import pytest
from helpers import compose, run_script

from pipelines.core.errors import UserError
from pipelines.launch import plan, preflight

BAD = [  # (override, the key the error must name)
    ("distill.lr=-1", "distill.lr"),
    ("distill.lr=0", "distill.lr"),
    ("distill.min_lr=1", "distill.min_lr"),            # above lr
    ("distill.weight_decay=-0.1", "distill.weight_decay"),
    ("distill.adam_beta1=1", "distill.adam_beta1"),
    ("distill.adam_beta2=0", "distill.adam_beta2"),
    ("distill.clip_grad=0", "distill.clip_grad"),
    ("distill.kd_weight=1.5", "distill.kd_weight"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.train_steps=0", "distill.train_steps"),
    ("distill.chunk_tokens=0", "distill.chunk_tokens"),
    ("distill.eval_samples=0", "distill.eval_samples"),
    ("distill.save_interval=-1", "distill.save_interval"),
    ("distill.warmup_steps=500", "distill.warmup_steps"),   # not below train_steps (200)
    ("distill.dtype=float16", "distill.dtype"),
    ("distill.recompute=some", "distill.recompute"),
    ("distill.keep_final_checkpoint=sometimes", "distill.keep_final_checkpoint"),
    ("correct.lr=-1", "correct.lr"),
    ("logits.k=0", "logits.k"),
    ("logits.k=5000", "logits.k"),                    # the demo vocabulary is 1024
    ("logits.samples=0", "logits.samples"),
    ("logits.samples_per_shard=0", "logits.samples_per_shard"),
    ("logits.batch_size=0", "logits.batch_size"),
    ("prune.calib_samples=0", "prune.calib_samples"),
    ("eval.shots=-1", "eval.shots"),
    ("eval.batch_tokens=0", "eval.batch_tokens"),
    ("eval.backend=mystery", "eval.backend"),
    ("parallel.context=2", "parallel.context"),
    ("distill.quantize=fp9", "distill.quantize"),
    ("distill.quantize=nvfp4", "distill.quantize"),      # GPU only
    ("distill.quantize=[fp8]", "distill.quantize"),      # one format, not a list
    ("correct.quantize=fp8", "correct.quantize"),        # the teacher is not trained quantized
    # hidden-state losses: the online teacher only, and well-formed pairs
    ("distill.intermediate=[{student:0,teacher:0}]", "distill.intermediate"),   # with the cache
    ("distill.intermediate=cosine", "distill.intermediate"),
    # kinds: a fraction where a whole number is wanted (int() truncated it), words, infinities, zeros
    ("logits.k=64.9", "logits.k"),
    ("distill.train_steps=200.7", "distill.train_steps"),
    ("distill.train_steps=many", "distill.train_steps"),
    ("distill.lr=inf", "distill.lr"),
    ("distill.adam_beta1=nan", "distill.adam_beta1"),
    ("distill.kd_weight=half", "distill.kd_weight"),
    ("prune.target_num_layers=2.5", "prune.target_num_layers"),
    ("data.valid_fraction=some", "data.valid_fraction"),
    ("parallel.tensor=1.5", "parallel.tensor"),
    ("cluster.processes=0", "cluster.processes"),
    # a word where a list is wanted
    ("data.files=book.txt", "data.files"),
    ("run.students=depth", "run.students"),
    ("eval.mmlu.subjects=astronomy", "eval.mmlu.subjects"),
]


@pytest.mark.parametrize("override, key", BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_its_key_before_any_compute(override, key):
    cfg = compose("pipeline", ["experiment=demo", override])
    with pytest.raises(UserError, match=rf"\(fix: {key}"):
        preflight.check(cfg, plan.pipeline_stages(cfg))


@pytest.mark.parametrize("overrides", [["eval.lm_eval.tasks=[]"], ["eval.lm_eval.tasks=[mmlu,no_such_task]"],
                                       ["eval.mmlu.enabled=false"], ["cluster.processes=2"]])
def test_bad_harness_settings_name_their_key(overrides):
    cfg = compose("pipeline", ["experiment=demo", "eval.backend=lm_eval", *overrides])
    key = "run.stage_parallel.eval" if "processes" in overrides[0] else "eval.lm_eval.tasks"
    with pytest.raises(UserError, match=rf"\(fix: {key}"):
        preflight.check(cfg, ["eval"])


@pytest.mark.parametrize("args, message", [
    (["distill", "experiment=demo", "distill.lr=-1"], "error: distill.lr=-1.0 must be above 0 (fix: distill.lr)"),
    (["distill", "experiment=nonexistent"], "error: no experiment 'nonexistent' in configs/experiment/; one of: demo"),
    (["prune", "experiment=demo", "prune=foo"], "error: no prune 'foo' in configs/prune/; one of: depth, search, width"),
    (["distill", "experiment=demo", "distill.no_such_key=1"], "error: bad override"),
    (["prune", "experiment=demo", "run.students=depth"], "error: run.students='depth' must be a list"),
])
def test_the_stage_runner_prints_one_line_and_exits_2(args, message):
    result = run_script("scripts/stage.py", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_width_target_transformers_cannot_load_is_refused_before_compute():
    """SmolLM2-135M (hidden 576, 9 heads, 3 KV groups) to hidden 448 with 6 heads: transformers 5
    refuses 448 % 6 != 0 at export, after all the compute; the experiment check refuses it first."""
    cfg = compose("pipeline", ["experiment=demo", "prune=width", "model.hidden_size=576", "model.num_attention_heads=9",
                               "model.num_query_groups=3", "model.kv_channels=64", "model.ffn_hidden_size=1536",
                               "prune.target.hidden_size=448",
                               "prune.target.ffn_hidden_size=128", "prune.target.num_attention_heads=6"])
    with pytest.raises(UserError, match=r"not a multiple of num_attention_heads=6.*fix: prune.target.hidden_size"):
        preflight.check(cfg, ["prune"])


def test_every_width_target_the_checks_accept_loads_in_transformers():
    """Over a grid of targets from a GQA teacher, accepted means transformers builds the export."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.hf import llama_map

    accepted = refused = 0
    for hidden in (384, 448, 512, 576):
        for heads in (3, 6, 7, 8, 9):
            cfg = compose("pipeline", ["experiment=demo", "prune=width", "model.hidden_size=576",
                                       "model.num_attention_heads=9", "model.num_query_groups=3",
                                       "model.kv_channels=64", "model.ffn_hidden_size=1536", f"prune.target.hidden_size={hidden}",
                                       "prune.target.ffn_hidden_size=256", f"prune.target.num_attention_heads={heads}"])
            try:
                student = preflight.check(cfg, ["prune"])["student"]
            except UserError:
                refused += 1
                continue
            accepted += 1
            config = LlamaConfig(**llama_map.hf_config(student, torch.float32))
            with torch.device("meta"):
                LlamaForCausalLM(config)
    assert accepted >= 4 and refused >= 4, (accepted, refused)


FREE_FORM = {  # string keys whose every value is legal
    "eval.model": "teacher | pruned | distilled | all, or any checkpoint path",
    "data.name": "names the tokenized folder",
    "data.text_key": "a field name of the user's JSONL",
    "data.hf_split": "a split name of the user's dataset",
    "data.chat.messages_key": "a field name of the user's records",
    "data.chat.role_key": "a field name of the user's messages",
    "data.chat.content_key": "a field name of the user's messages",
}


# keys the other prune group reads (both group files carry them, marked "unused here")
UNUSED = {"depth": ("prune.target.",), "width": ("prune.target_num_layers", "prune.criterion"),
          "search": ("prune.target_num_layers", "prune.target.", "prune.criterion", "prune.drop_layers")}


def _leaves(node, prefix):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def test_every_number_and_option_key_refuses_a_bad_value_by_name():
    """Every numeric key of the stage sections takes -7, every option key a made-up word: each must
    be refused by the experiment check before any compute, naming that key (free-form strings and
    paths aside: the stage checks paths when it starts, see the next test)."""
    from omegaconf import OmegaConf

    tried, unnamed = 0, []
    for group in ("depth", "width", "search"):
        raw = OmegaConf.to_container(compose("pipeline", ["experiment=demo", f"prune={group}"]), resolve=False)
        for section in ("distill", "correct", "logits", "prune", "eval", "data", "parallel"):
            for key, value in _leaves(raw[section], section):
                if isinstance(value, bool) or value is None or key in FREE_FORM:
                    continue
                if isinstance(value, (int, float)):
                    trial = "-7"
                elif isinstance(value, str) and "${" not in value and "/" not in value:
                    trial = "made_up"
                else:
                    continue  # interpolations and paths
                if group != "depth" and not key.startswith("prune."):
                    continue  # once is enough outside the prune group
                if key.startswith(UNUSED[group]):
                    continue
                tried += 1
                cfg = compose("pipeline", ["experiment=demo", f"prune={group}", f"{key}={trial}"])
                try:
                    preflight.check(cfg, plan.pipeline_stages(cfg))
                    unnamed.append(f"{key}={trial} passed")
                except UserError as error:
                    if f"fix: {key}" not in str(error):
                        unnamed.append(f"{key}={trial}: {error}")
    assert tried > 60 and not unnamed, unnamed


@pytest.mark.parametrize("stage, override, key", [
    ("distill", "distill.student=/nonexistent/student", "distill.student"),
    ("logits", "logits.teacher=/nonexistent/teacher", "logits.teacher"),
    ("prune", "prune.source=/nonexistent/teacher", "prune.source"),
    ("import", "run.teacher_hf=/nonexistent/hf", "import.source"),
])
def test_a_path_that_does_not_exist_is_named_by_the_stage(stage, override, key, tmp_path):
    result = run_script("scripts/stage.py", stage, "experiment=demo", f"paths.runs={tmp_path}",
                        "run.random_teacher=false", override)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"(fix: {key}" in result.stderr and "/nonexistent/" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("override, key", [("cluster.nodes=0", "cluster.nodes"),
                                           ("cluster.gpus_per_node=-1", "cluster.gpus_per_node"),
                                           ("cluster.cpus_per_task=0", "cluster.cpus_per_task"),
                                           ("cluster.tasks_per_node=2.5", "cluster.tasks_per_node"),
                                           ("cluster.partition='gpu;rm -rf x'", "cluster.partition"),
                                           ("cluster.job_prefix='$(id)'", "cluster.job_prefix")])
def test_zeros_and_fractions_in_the_cluster_keys_are_refused_by_name(override, key):
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", "cluster=slurm", override])
    with pytest.raises(UserError, match=rf"\(fix: {key}\)"):
        preflight.check(cfg, plan.pipeline_stages(cfg))


@pytest.mark.parametrize("name", ["", "..", "../elsewhere", "a/b", "$(touch pwned)", "with space", ".hidden"])
def test_a_run_name_that_escapes_the_runs_folder_or_the_shell_is_refused(name, tmp_path):
    cfg = compose("pipeline", ["experiment=demo", f"paths.runs={tmp_path}"])
    cfg.run.name = name
    with pytest.raises(UserError, match=r"\(fix: run.name\)"):
        preflight.check(cfg, plan.pipeline_stages(cfg))
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "pwned").exists()


def test_a_typo_key_in_an_experiment_file_is_refused_with_the_closest_key(tmp_path, monkeypatch):
    """``train_step: 20`` beside ``train_steps`` composed as a new key and changed nothing."""
    import shutil

    from helpers import REPO

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "configs" / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny\nrun:\n  name: typo\ndistill:\n  train_step: 20\n")
    monkeypatch.setattr(preflight, "REPO", tmp_path)
    with pytest.raises(UserError, match=r"unknown key distill.train_step .*did you mean distill.train_steps\?"):
        preflight.compose_pipeline(["experiment=typo"], check_keys=True)
    for shipped in ("demo", "smollm2_135m", "smollm2_135m_chat", "llama31_8b_width_4b", "llama31_8b_depth_4b",
                    "llama31_8b_search_4b", "llama31_8b_latency"):
        preflight.compose_pipeline([f"experiment={shipped}"], check_keys=True)     # every shipped one passes


def test_a_second_checkout_sharing_this_environment_is_refused(tmp_path):
    """Two clones, one venv: run from the other one, the launcher would run this checkout's code
    and write into this checkout's runs/."""
    import shutil
    import subprocess
    import sys

    from helpers import REPO

    other = tmp_path / "other-clone"
    shutil.copytree(REPO / "configs", other / "configs")
    shutil.copytree(REPO / "pipelines", other / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "stage.py"), "report", "experiment=demo"],
                            cwd=other, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "(fix: the Python environment)" in result.stderr, result.stderr[-2000:]
    assert not (other / "runs").exists()


@pytest.mark.parametrize("config, message", [
    ('{"model_type": "llama", "hidden_size": 64, "num_hid', "config.json is not valid JSON at line 1"),
    ('{"model_type": "llama", "hidden_size": 64, "vocab_size": 300}', "has no intermediate_size, num_hidden_layers"),
])
def test_a_broken_hugging_face_config_is_one_line(config, message, tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text(config)
    result = run_script("scripts/import.py", f"import.source={source}", f"import.output={tmp_path / 'out'}")
    assert result.returncode == 2 and message in result.stderr and "(fix: import.source)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_torn_manifest_is_one_line_naming_its_folder(tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    (student / "manifest.json").write_text('{"stage": "prune", "written_at": "2026-')
    result = run_script("scripts/stage.py", "distill", "experiment=demo", f"paths.runs={tmp_path / 'runs'}",
                        f"distill.student={student}")
    assert result.returncode == 2 and "manifest.json is not valid JSON" in result.stderr, result.stderr[-2000:]
    assert f"(fix: move {student} aside to redo its stage)" in result.stderr and "Traceback" not in result.stderr
    assert (student / "manifest.json").read_text() == '{"stage": "prune", "written_at": "2026-'


def test_an_override_with_bad_syntax_is_one_line():
    result = run_script("scripts/stage.py", "distill", "experiment=demo", "distill.lr=[1,")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "(fix: ARGS)" in result.stderr


@pytest.mark.parametrize("runs", ["with space", 'quote"d'])
def test_a_runs_folder_an_sbatch_line_cannot_carry_is_refused_by_name(tmp_path, runs):
    """``#SBATCH --output=<runs>/...`` is not a shell line: no quoting reaches sbatch intact everywhere."""
    folder = tmp_path / runs
    result = run_script("scripts/stage.py", "prepare", "experiment=demo", "cluster=slurm", f"paths.runs='{folder}'",
                        "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "an #SBATCH line cannot carry" in result.stderr and "(fix: paths.runs)" in result.stderr
    assert not folder.exists()
    cfg = compose("pipeline", ["experiment=demo", "cluster=slurm", f"paths.runs='{folder}'"])
    from pipelines.tools import cluster_check

    with pytest.raises(UserError, match=r"\(fix: paths.runs\)"):
        cluster_check.batch_script(cfg, [])


@pytest.mark.parametrize("entry, message", [
    ("{student:0,teacher:0,loss:l1}", "loss='l1'"),
    ("{student:-1,teacher:0}", "must be a layer number"),
    ("{student:0,teacher:0,weight:0}", "must be a number above 0"),
    ("{student:0,teacher:0,scale:2}", "unknown keys ['scale']"),
    ("{student:0.5,teacher:0}", "must be a layer number"),
])
def test_a_malformed_hidden_state_pair_is_refused_by_name(entry, message):
    cfg = compose("pipeline", ["experiment=demo", "distill.teacher=online", f"distill.intermediate=[{entry}]"])
    with pytest.raises(UserError, match=r"\(fix: distill.intermediate\)") as error:
        preflight.check(cfg, plan.pipeline_stages(cfg))
    assert message in str(error.value)


def test_hidden_state_pairs_need_one_pipeline_stage():
    cfg = compose("pipeline", ["experiment=demo", "distill.teacher=online", "parallel.pipeline=2", "cluster.processes=2",
                               "distill.intermediate=[{student:0,teacher:0}]"])
    with pytest.raises(UserError, match=r"parallel.pipeline=1 \(fix: distill.intermediate\)"):
        preflight.check(cfg, ["distill"])
