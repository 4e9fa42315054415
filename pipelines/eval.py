"""The eval stage: MMLU, the corpus task and validation loss of one checkpoint (``scripts/eval.py``).

``eval.backend=native`` (the default) scores MMLU with our evaluator, below; ``lm_eval`` scores it
(and any other task it knows) with lm-evaluation-harness on the checkpoint's Hugging Face export
(:mod:`pipelines.harness`), in one process. The two choose the same letters: ``tests/test_evaluate.py``
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

from pipelines import checkpoint, corpus_task, harness, mmlu
from pipelines.artifacts import config_hash, read_manifest, sha256_file, write_json
from pipelines.data import TokenWindows
from pipelines.errors import require
from pipelines.model import count_parameters, lm_loss, local_logits
from pipelines.stage import Stage


def loglikelihoods(forward, requests, batch_tokens: int, vocab_size: int, rank: int = 0, world: int = 1,
                   tp_group=None):
    """Log-likelihood of each continuation of each ``(context ids, [continuation ids, ...])``.

    Returns ``{request index: [score per continuation]}`` for the requests this rank scored
    (batches are dealt round-robin over ``world`` ranks). ``forward(tokens [b, s])`` returns
    logits ``[b, s, >= vocab_size]``, or this rank's vocabulary slice of them with ``tp_group``
    (the scored positions' log-softmax is then reduced over the group, never gathered).
    """
    from pipelines.kd_loss import token_logprobs

    rows = []  # (request, choice or None, input ids, positions, target ids)
    for index, (context, continuations) in enumerate(requests):
        if all(len(c) == 1 for c in continuations):
            rows.append((index, None, context, [len(context) - 1], [c[0] for c in continuations]))
        else:
            for choice, continuation in enumerate(continuations):
                sequence = context + continuation
                rows.append((index, choice, sequence[:-1],
                             list(range(len(context) - 1, len(sequence) - 1)), continuation))
    # batch whole requests (all rows of a request in one pass, so one rank scores all its choices)
    by_request: dict[int, list[int]] = {}
    for number, row in enumerate(rows):
        by_request.setdefault(row[0], []).append(number)
    units = sorted(by_request.values(), key=lambda unit: -max(len(rows[r][2]) for r in unit))
    batches, current, longest = [], [], 0
    for unit in units:
        unit_longest = max(len(rows[r][2]) for r in unit)
        longest_if_added = max(longest, unit_longest)
        if current and longest_if_added * (len(current) + len(unit)) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], unit_longest
        current += unit
        longest = longest_if_added
    if current:
        batches.append(current)
    results: dict[int, list[float]] = {}
    for batch in batches[rank::world]:
        length = max(len(rows[r][2]) for r in batch)
        tokens = torch.zeros(len(batch), length, dtype=torch.long)
        for i, r in enumerate(batch):
            tokens[i, : len(rows[r][2])] = torch.tensor(rows[r][2])
        with torch.no_grad():
            logits = forward(tokens)
        for i, r in enumerate(batch):
            index, choice, _, positions, targets = rows[r]
            scored = logits[i, positions]
            if choice is None:  # one position, every choice's single token
                ids = torch.tensor([targets], device=scored.device)
                results[index] = token_logprobs(scored, ids, vocab_size, tp_group, None)[0].tolist()
            else:  # one token of this choice per position
                ids = torch.tensor(targets, device=scored.device)[:, None]
                score = token_logprobs(scored, ids, vocab_size, tp_group, None).sum().item()
                results.setdefault(index, [0.0] * 4)[choice] = score
    return results


def load_questions(eval_cfg):
    """``(shots by subject, scored questions by subject)`` of the ``eval`` config."""
    return mmlu.load(str(eval_cfg.mmlu.source), eval_cfg.mmlu.get("path"), int(eval_cfg.shots),
                     eval_cfg.mmlu.get("subjects"), eval_cfg.get("limit"))


def mmlu_requests(eval_cfg, tokenizer_dir: Path, max_length: int, loaded=None):
    shots_by_subject, scored = loaded or load_questions(eval_cfg)
    encoder = mmlu.Encoder(tokenizer_dir, max_length)
    questions = [q for qs in scored.values() for q in qs]
    requests = [(encoder.encode(q, shots_by_subject.get(q.subject, [])), encoder.continuations)
                for q in questions]
    return questions, requests, encoder


def scores(model, requests, batch_tokens: int, vocab_size: int, layout) -> list[list[float]]:
    """The log-likelihood of every continuation of every request, scored over the data-parallel
    ranks (each rank returns all of them)."""
    from megatron.core import parallel_state

    mine = loglikelihoods(lambda t: local_logits(model, layout.place(t)), requests, batch_tokens, vocab_size,
                          parallel_state.get_data_parallel_rank(), layout.data_parallel,
                          parallel_state.get_tensor_model_parallel_group())
    gathered = [None] * layout.data_parallel
    torch.distributed.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(len(requests))]


def choose(model, requests, batch_tokens: int, vocab_size: int, layout) -> list[int]:
    """The most likely continuation of each request."""
    return [mmlu.argmax(s) for s in scores(model, requests, batch_tokens, vocab_size, layout)]


def run_corpus_task(model, eval_cfg, data: Path, vocab_size: int, layout) -> dict:
    """The corpus multiple-choice task (:mod:`pipelines.corpus_task`)."""
    c = eval_cfg.corpus
    started = time.perf_counter()
    built = corpus_task.questions(data, int(c.questions), int(c.context_tokens), int(c.continuation_tokens),
                                  int(c.seed))
    predictions = choose(model, [(context, choices) for context, choices, _ in built],
                         int(eval_cfg.batch_tokens), vocab_size, layout)
    summary = corpus_task.summarize([p == answer for p, (_, _, answer) in zip(predictions, built)])
    return {**summary, "seconds": time.perf_counter() - started, "predictions": predictions}


def mmlu_summary(questions, loglik: list[list[float]], seconds: float, **extra) -> dict:
    """:func:`pipelines.mmlu.summarize` of the letters ``loglik`` chooses, with the predictions and
    the log-likelihoods (either evaluator's)."""
    predictions = [mmlu.argmax(s) for s in loglik]
    summary = mmlu.summarize([q.subject for q in questions],
                             [p == q.answer for p, q in zip(predictions, questions)])
    summary.update(seconds=seconds, predictions=predictions, loglikelihoods=[[round(x, 5) for x in s] for s in loglik],
                   **extra)
    return summary


def run_mmlu(model, eval_cfg, tokenizer_dir: Path, vocab_size: int, layout, loaded=None) -> dict:
    questions, requests, encoder = mmlu_requests(eval_cfg, tokenizer_dir, int(eval_cfg.max_length), loaded)
    started = time.perf_counter()
    loglik = scores(model, requests, int(eval_cfg.batch_tokens), vocab_size, layout)
    return mmlu_summary(questions, loglik, time.perf_counter() - started, single_token_answers=encoder.single_token,
                        prompt_tokens=sum(len(r[0]) for r in requests))


def models_in_run(run_dir: Path) -> list[tuple[str, str]]:
    """``(eval.model, run.student)`` of every finished checkpoint in a run: teacher, pruned, distilled."""
    from pipelines.experiment import teacher

    found = []
    if read_manifest(Path(teacher(str(run_dir)))):
        found.append(("teacher", ""))
    for prefix, model in (("prune_", "pruned"), ("distill_", "distilled")):
        for folder in sorted(run_dir.glob(f"{prefix}*")):
            if read_manifest(folder) and (folder / "model.yaml").exists():
                found.append((model, folder.name[len(prefix):]))
    return found


def each_model(cfg) -> list:
    """``eval.model=all``: one config per finished model of the run (teacher, pruned, distilled)."""
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
    checkpoint.read_architecture(folder, "eval.checkpoint")
    require((folder / "tokenizer").is_dir(), f"checkpoint {folder} has no tokenizer/ folder", "eval.checkpoint")
    return {"checkpoint": str(folder.resolve()), "checkpoint_written_at": read_manifest(folder).get("written_at"),
            "checkpoint_manifest_sha256": sha256_file(folder / "manifest.json"),
            "eval": config_hash({k: v for k, v in dict(e).items() if k not in ("output", "name")}),
            "data": str(Path(str(cfg.data.output)).resolve())}


def checks(cfg, arch, layout) -> None:
    from pipelines.validate import section_ranges

    section_ranges(cfg, "eval", arch)
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
    ``eval.lm_eval.tasks`` is ``eval.mmlu``'s questions as local tasks (:mod:`pipelines.harness`)."""
    from omegaconf import OmegaConf

    from pipelines import convert

    e, h = cfg.eval, cfg.eval.lm_eval
    folder, hf = Path(str(e.checkpoint)), staging / "hf"
    hf.mkdir()
    convert.export_checkpoint(OmegaConf.create({"export": {"source": str(folder), "output": str(hf),
                                                           "max_shard_bytes": int(h.max_shard_bytes)}}),
                              layout, hf, {})
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


def run(cfg, layout, staging: Path, inputs: dict) -> dict:
    """Evaluate ``eval.checkpoint`` into ``staging/results.json``; the manifest's fields."""
    e = cfg.eval
    folder = Path(str(e.checkpoint))
    loaded = load_questions(e) if bool(e.mmlu.enabled) else None   # read (and so checked) first
    harness_backend = str(e.backend) == "lm_eval"
    harness_mmlu = harness_backend and "mmlu" in [str(t) for t in e.lm_eval.tasks]   # else ours scores MMLU
    model, arch = checkpoint.load_model(folder, layout, dtype=layout.compute_dtype)
    model.eval()
    name = str(e.get("name") or folder.name)
    results = {"name": name, "checkpoint": str(folder), "params": count_parameters(arch), "backend": str(e.backend),
               "architecture": {k: arch[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                      "num_attention_heads", "num_query_groups")}}
    if int(e.val_samples) > 0:
        valid = TokenWindows(Path(str(cfg.data.output)), "valid", int(e.sequence_length))
        batches = map(layout.place, valid.batches(int(e.batch_size), int(e.val_samples)))
        results["val_loss"] = lm_loss(model, batches, arch["vocab_size"])
        results["val_ppl"] = float(torch.tensor(results["val_loss"]).exp())
        print(f"[eval] {name}: validation loss {results['val_loss']:.4f} (ppl {results['val_ppl']:.1f})",
              flush=True)
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
              checks=checks, source=lambda cfg: Path(str(cfg.eval.checkpoint)), distributed=True,
              each=each_model)
