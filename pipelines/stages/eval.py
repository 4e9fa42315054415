"""The eval stage: MMLU, the corpus task and validation loss of one checkpoint (``scripts/eval.py``).

``eval.backend=native`` (the default) scores MMLU with our evaluator (:mod:`pipelines.evaluation.scoring`); ``lm_eval`` scores it
(and any other task it knows) with lm-evaluation-harness on the checkpoint's Hugging Face export
(:mod:`pipelines.evaluation.harness`), in one process. The two choose the same letters: ``tests/integration/test_evaluate.py``
and ``bench/lm_eval_agreement.py`` check it.

Forward passes are batched by length (prompts sorted, right-padded; causal attention makes the
padding invisible to the scored positions), split over data-parallel ranks, and run at any
tensor-parallel size (the checkpoint is resharded on load); pipeline parallel size must be 1.
Results go to ``<eval.output>/results.json`` and the folder's manifest, with what reproduces them.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import torch

from pipelines.core.artifacts import config_hash, read_json, read_manifest, sha256_file, write_json
from pipelines.core.errors import require
from pipelines.core.experiment import teacher
from pipelines.data.corpus import TokenWindows, check_tokenized_for
from pipelines.evaluation import harness
from pipelines.evaluation.scoring import load_questions, mmlu_summary, run_corpus_task, run_mmlu
from pipelines.hf import convert
from pipelines.model import checkpoint
from pipelines.model.build import count_parameters, windows_loss
from pipelines.ops.masks import hf_inputs
from pipelines.stages.base import Stage
from pipelines.stages.rules import section_ranges


def models_in_run(run_dir: Path) -> list[tuple[str, str]]:
    """``(eval.model, run.student)`` of every finished checkpoint in a run: teacher, pruned, distilled."""

    found = []
    if read_manifest(Path(teacher(str(run_dir)))):
        found.append(("teacher", ""))
    for prefix, model in (("prune_", "pruned"), ("distill_", "distilled")):
        for folder in sorted(run_dir.glob(f"{prefix}*")):
            if read_manifest(folder) and (folder / "model.yaml").exists():
                found.append((model, folder.name[len(prefix):]))
    for folder in sorted(run_dir.glob("quantize_*")):
        manifest = read_manifest(folder)
        for fmt in (manifest or {}).get("formats", []):
            found.append((f"quantized_{fmt}", folder.name[len("quantize_"):]))
    return found


def quantized(folder: Path) -> bool:
    """A quantize stage export (ModelOpt's unified Hugging Face layout), not an engine checkpoint."""
    return (folder / "hf_quant_config.json").exists()


def architecture_folder(cfg) -> Path:
    """Where ``eval.checkpoint``'s architecture is read: itself, or for a quantized export the
    student it was made from (the quantize stage's manifest names it)."""
    folder = Path(str(cfg.eval.checkpoint))
    if quantized(folder):
        require(read_manifest(folder.parent) is not None, f"{folder} is not in a finished quantize folder",
                "eval.checkpoint")
        return Path(read_json(folder.parent / "quantize_report.json", "eval.checkpoint")["source"])
    return folder


def each_model(cfg) -> list:
    """``eval.model=all``: one config per finished model of the run (teacher, pruned, distilled, quantized)."""
    if str(cfg.eval.model) != "all":
        return [cfg]
    from omegaconf import OmegaConf

    run_dir = Path(str(cfg.run.dir))
    found = models_in_run(run_dir)
    require(found, f"no finished teacher, pruned or distilled checkpoint in {run_dir}", "run.name")
    configs = []
    for model, student in found:
        one = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        one.eval.model, one.run.student = model, student or "none"
        configs.append(one)
    return configs


def eval_inputs(cfg) -> dict:
    e = cfg.eval
    folder = Path(str(e.checkpoint))
    checkpoint.read_architecture(architecture_folder(cfg), "eval.checkpoint")
    require((folder / "tokenizer").is_dir(), f"checkpoint {folder} has no tokenizer/ folder", "eval.checkpoint")
    made = folder.parent if quantized(folder) else folder
    return {"checkpoint": str(folder.resolve()), "checkpoint_written_at": read_manifest(made).get("written_at"),
            "checkpoint_manifest_sha256": sha256_file(made / "manifest.json"),
            "eval": config_hash({k: v for k, v in dict(e).items() if k not in ("output", "name", "speed")
                                 and (k != "generate" or len(e.generate.prompts) > 0)}),   # off: not stamped
            "data": str(Path(str(cfg.data.output)).resolve())}


def run_generations(model, cfg, folder: Path, vocab_size: int, layout, name: str) -> list[dict]:
    """``eval.generate``'s prompts, answered greedily (:mod:`pipelines.evaluation.generate`), with the
    data's tokenizer and chat template when the data is conversations (the checkpoint's otherwise)."""
    from transformers import AutoTokenizer

    from pipelines.data.chat import load_template
    from pipelines.evaluation.generate import generations

    chat = str(cfg.data.source) == "chat"
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.data.tokenizer) if chat else str(folder / "tokenizer"))
    if chat:
        load_template(tokenizer, cfg.data)
    model.eval()
    found = generations(model, tokenizer, list(cfg.eval.generate.prompts), int(cfg.eval.generate.max_new_tokens),
                        vocab_size, layout)
    for row in found:
        print(f"[eval] {name} on {row['prompt'][:40]!r}: {row['text'][:120]!r}", flush=True)
    return found


def checks(cfg, arch, layout) -> None:
    check_tokenized_for(Path(str(cfg.data.output)), Path(str(cfg.eval.checkpoint)), arch["vocab_size"],
                        "data.tokenizer")

    section_ranges(cfg, "eval", arch)
    if quantized(Path(str(cfg.eval.checkpoint))):
        require(str(cfg.eval.backend) == "native", "a quantized export is scored by eval.backend=native "
                "(fake-quantized from its files)", "eval.backend")
        require(layout is None or int(layout["tensor"]) == 1, "a quantized export is scored at tensor parallel "
                "size 1", "run.stage_parallel.eval")
    if str(cfg.eval.backend) == "lm_eval":
        require(importlib.util.find_spec("lm_eval") is not None, "eval.backend=lm_eval needs lm-evaluation-harness "
                "(pip install lm-eval)", "eval.backend")
        tasks = [str(t) for t in cfg.eval.lm_eval.tasks]
        require(tasks, "eval.backend=lm_eval has no task to run", "eval.lm_eval.tasks")
        require("mmlu" not in tasks or bool(cfg.eval.mmlu.enabled), "eval.lm_eval.tasks names mmlu, but "
                "eval.mmlu.enabled is false", "eval.lm_eval.tasks")
        harness.check_tasks([t for t in tasks if t != "mmlu"])
        if layout is not None:
            require(int(layout["tensor"]) * int(layout["data"]) == 1, "eval.backend=lm_eval runs the "
                    "harness in one process (tensor and data parallel size 1)",
                    "run.stage_parallel.eval / eval.backend")
    if layout is not None:
        require(int(layout["pipeline"]) == 1, "evaluation runs with pipeline parallel size 1 (any checkpoint "
                "loads resharded)", "run.stage_parallel.eval / parallel.pipeline")


def run_harness(cfg, layout, staging: Path, loaded) -> dict:
    """``eval.backend=lm_eval``: lm-evaluation-harness on the checkpoint's Hugging Face export
    (written to ``staging/hf`` and removed after, unless ``eval.lm_eval.keep_hf``); ``"mmlu"`` in
    ``eval.lm_eval.tasks`` is ``eval.mmlu``'s questions as local tasks (:mod:`pipelines.evaluation.harness`)."""
    e, h = cfg.eval, cfg.eval.lm_eval
    folder, hf = Path(str(e.checkpoint)), staging / "hf"
    hf.mkdir()
    convert.export_to(folder, hf, layout, int(h.max_shard_bytes))
    tasks = [str(t) for t in h.tasks]
    local = "mmlu" in tasks   # checks() made sure eval.mmlu is enabled then
    if local:
        harness.write_mmlu_tasks(staging / "lm_eval_tasks", *loaded)
        tasks[tasks.index("mmlu")] = harness.GROUP
    started = time.perf_counter()
    out = harness.evaluate(hf, tasks, staging / "lm_eval_tasks" if local else None, int(e.shots),
                           str(layout.device), str(layout.compute_dtype).replace("torch.", ""),
                           int(h.batch_size), int(e.max_length))
    found = {"version": out["version"], "tasks": out["results"], "groups": out["groups"],
             "seconds": time.perf_counter() - started}
    if local:
        _, scored = loaded
        questions = [q for qs in scored.values() for q in qs]
        found["mmlu"] = mmlu_summary(questions, harness.mmlu_loglikelihoods(out, scored), found["seconds"],
                                     backend="lm_eval",
                                     harness_group_acc=out["groups"].get(harness.GROUP, {}).get("acc,none"))
    if not bool(h.keep_hf):
        shutil.rmtree(hf)
    return found


class HFLogits(torch.nn.Module):
    """A Hugging Face causal LM called as the scorers call an engine model: ``(tokens, positions,
    mask)`` to logits ``[b, s, vocab]`` (tensor parallel size 1)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, position_ids=None, attention_mask=None):
        return self.model(**hf_inputs(tokens, position_ids, attention_mask, self.model.dtype)).logits


def run(cfg, layout, staging: Path, inputs: dict) -> dict:
    """Evaluate ``eval.checkpoint`` into ``staging/results.json``; the manifest's fields."""
    e = cfg.eval
    folder = Path(str(e.checkpoint))
    loaded = load_questions(e) if bool(e.mmlu.enabled) else None   # read (and so checked) first
    harness_backend = str(e.backend) == "lm_eval"
    harness_mmlu = harness_backend and "mmlu" in [str(t) for t in e.lm_eval.tasks]   # else ours scores MMLU
    if quantized(folder):
        from pipelines.quantization.load import load_fake_quantized

        arch, _ = checkpoint.read_architecture(architecture_folder(cfg), "eval.checkpoint")
        model = HFLogits(load_fake_quantized(folder, layout.compute_dtype, layout)[0])
    else:
        model, arch = checkpoint.load_model(folder, layout, dtype=layout.compute_dtype)
    model.eval()
    name = str(e.get("name") or folder.name)
    results = {"name": name, "checkpoint": str(folder), "params": count_parameters(arch), "backend": str(e.backend),
               "architecture": {k: arch[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                      "num_attention_heads", "num_query_groups")}}
    if quantized(folder):
        made = read_json(folder.parent / "quantize_report.json", "eval.checkpoint")["formats"][folder.name]
        results["quantization"] = {"format": folder.name, "student": folder.parent.name[len("quantize_"):],
                                   **{k: made[k] for k in ("quant_algo", "weight_bits", "group_size", "bytes",
                                                           "export_logit_drift")},
                                   "method": made.get("method", "PTQ")}
    if int(e.val_samples) > 0:
        valid = TokenWindows(Path(str(cfg.data.output)), "valid", int(e.sequence_length))
        results["val_loss"] = windows_loss(model, valid, int(e.batch_size), int(e.val_samples), arch["vocab_size"],
                                           layout.place)
        results["val_ppl"] = float(torch.tensor(results["val_loss"]).exp())
        results["val_tokens"] = valid.loss_on   # conversations: the assistant's tokens (data.chat.loss_on)
        print(f"[eval] {name}: validation loss {results['val_loss']:.4f} (ppl {results['val_ppl']:.1f}) on "
              f"{valid.loss_on} tokens", flush=True)
    if len(e.generate.prompts) > 0 and not quantized(folder):
        results["generations"] = run_generations(model, cfg, folder, arch["vocab_size"], layout, name)
    if bool(e.mmlu.enabled) and not harness_mmlu:
        results["mmlu"] = run_mmlu(model, e, folder / "tokenizer", arch["vocab_size"], layout, loaded)
    if bool(e.corpus.enabled):
        corpus = run_corpus_task(model, e, Path(str(cfg.data.output)), arch["vocab_size"], layout)
        results["corpus"] = corpus
        print(f"[eval] {name}: corpus task {corpus['accuracy']:.4f} ± {corpus['se']:.4f} over "
              f"{corpus['questions']} questions (chance 0.25) ({corpus['seconds']:.1f} s)", flush=True)
    if harness_backend:
        del model   # the harness loads the Hugging Face export itself
        found = run_harness(cfg, layout, staging, loaded)
        if "mmlu" in found:
            results["mmlu"] = found.pop("mmlu")
        results["lm_eval"] = found
        for task, metrics in found["tasks"].items():
            if not task.startswith(harness.GROUP):
                print(f"[eval] {name}: lm_eval {task} {metrics}", flush=True)
    if "mmlu" in results:
        summary = results["mmlu"]
        print(f"[eval] {name}: MMLU {int(e.shots)}-shot ({e.backend}) macro {summary['macro']:.4f} micro "
              f"{summary['micro']:.4f} over {summary['questions']} questions in "
              f"{len(summary['subjects'])} subjects ({summary['seconds']:.1f} s)", flush=True)
    if layout.is_main:
        write_json(staging / "results.json", results)
    return {"name": name, "backend": str(e.backend), "mmlu_source": str(e.mmlu.source), "shots": int(e.shots),
            "limit": e.get("limit"), "val_loss": results.get("val_loss"),
            "mmlu_macro": results.get("mmlu", {}).get("macro"), "mmlu_micro": results.get("mmlu", {}).get("micro"),
            "corpus_accuracy": results.get("corpus", {}).get("accuracy"), "params": results["params"]}


STAGE = Stage(name="eval", output=lambda cfg: Path(str(cfg.eval.output)), inputs=eval_inputs, run=run,
              checks=checks, source=architecture_folder, distributed=True,
              each=each_model)
