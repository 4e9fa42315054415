"""Distilling on conversations: what the masked cache costs, and KD against CE-only at equal tokens.

    .venv/bin/python bench/chat_distill.py              # the smollm2_135m_chat experiment, 3 seeds
    .venv/bin/python bench/chat_distill.py --steps 30   # shorter
    .venv/bin/python bench/chat_distill.py --quick      # the demo's teacher and depth student, 1 seed (CI)

The experiment's stages up to the teacher cache and its depth student run first
(``scripts/stage.py``: skipped where they already ran): conversations rendered with the teacher's
chat template, the loss and the cache on the assistant's tokens only (``data.chat.loss_on``). The
conversations are a conversation-shaped view of Jane Austen's novels (no package registry here
ships an instruction data set). Then, for each of ``--seeds`` data orders, the depth student is
distilled twice for ``--steps`` steps on the same tokens: KD from the cache (the recipe's default,
``kd_weight`` 0.7) and CE only (``distill.teacher=none``). Each loss is the distill stage's own at
its last step, on the held-out conversations' assistant tokens, each conversation alone in its
attention (``data.chat.packing=isolated``, the default).

Beside them (not in ``--quick``), each seed's KD run is repeated on the same conversations packed
with attention crossing from one to the next (``data.chat.packing=shared``: its own data folder
and cache, from the same teacher), then scored by the eval stage on the isolated held-out
conversations: what training with the crossing costs a student that serves one conversation at a time.

``--quick`` runs the same on the demo run (its pre-trained tiny teacher and depth student, its
Austen tokenizer with a ChatML template given by ``data.chat_template``), in a temporary folder.

Last line: ``cache_bytes_per_token=<b> assistant_share=<s> kd_val_loss=<x> ce_val_loss=<y> seeds=<n>``
(the cache's bytes over every token of its samples; the share of the real tokens the loss counts),
with ``kd_shared_val_loss=<z>`` before ``seeds`` in the full run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, mean_sd, read, smollm2_checkpoint, stage
CHATML = REPO / "configs" / "data" / "chatml.jinja"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: the experiment's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the demo run, 20 steps, 1 seed (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 20, 1
    steps = [f"distill.train_steps={args.steps}"] if args.steps else []
    with tempfile.TemporaryDirectory(prefix="bench_chat_distill-", dir=REPO / "runs") as fresh:
        fresh = Path(fresh)
        if args.quick:
            demo = REPO / "runs" / "demo"
            stage("stage", ["prepare,import,correct,prune", "experiment=demo", "run.students=[depth]"])
            tokenizer = json.loads((REPO / "data" / "austen" / "manifest.json").read_text())["tokenizer"]
            common = ["experiment=demo", "data.source=chat", "data.chat.view=austen", "data.name=austen_chat",
                      f"data.output={fresh / 'data'}", f"data.tokenizer={tokenizer}", "data.train_tokenizer_vocab=null",
                      f"data.chat_template={CHATML}", "data.chat.sequence_length=128",
                      f"logits.teacher={demo / 'correct'}", f"logits.output={fresh / 'logits'}",
                      f"distill.cache={fresh / 'logits'}", f"distill.student={demo / 'prune_depth'}"]
            stage("prepare", common)
            stage("logits", common)
            data, cache = fresh / "data", fresh / "logits"
        else:
            smollm2_checkpoint()
            common = ["experiment=smollm2_135m_chat"]
            print("[chat_distill] smollm2_135m_chat: the stages up to the teacher cache and the depth student",
                  flush=True)
            stage("stage", ["prepare,import,correct,logits,prune", *common])
            run = REPO / "runs" / "smollm2_135m_chat"
            data, cache = REPO / "data" / "austen_chat_smollm2", run / "logits"
        chat = read(data)["chat"]
        share = chat["train"]["loss_share"]
        manifest = read(cache)
        per_token = manifest["bytes_per_token"]
        full = manifest["sample_bytes"] / manifest["sequence_length"]
        print(f"[chat_distill] {chat['train']['conversations']} train conversations, {100 * share:.1f}% of their "
              f"tokens the assistant's; cache {per_token:.1f} bytes/token ({full:.1f} with every token's labels)",
              flush=True)
        shared_windows, after_another = packed_together(data, chat["window"])
        print(f"[chat_distill] {100 * shared_windows:.0f}% of the training samples hold two or more conversations; "
              f"{100 * after_another:.0f}% of the counted labels follow another conversation in their sample",
              flush=True)
        losses: dict[str, list[float]] = {"kd": [], "ce": []}
        variants = {"kd": [], "ce": ["distill.teacher=none", "distill.kd_weight=0"]}
        for seed in range(1, args.seeds + 1):
            for name, extra in variants.items():
                output = fresh / f"{name}_{seed}"
                stage("distill", [*common, *steps, *extra, f"distill.data_seed={seed}", f"distill.output={output}",
                                  "distill.log_interval=1000", "distill.keep_final_checkpoint=false"])
                losses[name].append(read(output)["final"]["val_loss"])
                print(f"[chat_distill] seed {seed} {name}: assistant-token validation loss {losses[name][-1]:.4f}",
                      flush=True)
        if not args.quick:
            losses["kd_shared"] = shared_arm(common, steps, fresh, data, args.seeds)
    mean, sd = mean_sd(losses)
    for name in losses:
        print(f"  {name}: {mean[name]:.4f} ± {sd[name]:.4f}   ({', '.join(f'{v:.4f}' for v in losses[name])})")
    shared = f"kd_shared_val_loss={mean['kd_shared']:.4f} " if "kd_shared" in mean else ""
    print(f"cache_bytes_per_token={per_token:.2f} assistant_share={share:.4f} kd_val_loss={mean['kd']:.4f} "
          f"ce_val_loss={mean['ce']:.4f} {shared}seeds={args.seeds}")
    return 0


def packed_together(data: Path, window: int) -> tuple[float, float]:
    """The share of training samples holding two or more conversations, and of the counted labels
    that follow another conversation in their sample (what attention crossing would change)."""
    import numpy as np

    tokens, starts, mask = (np.memmap(data / f"train.{suffix}", dtype=dtype, mode="r")
                            for suffix, dtype in (("bin", np.int32), ("starts", np.uint8), ("mask", np.uint8)))
    samples = (len(tokens) - 1) // window
    pad = tokens[-1]   # the stream ends in padding, which starts runs of its own
    begins = (starts[:samples * window] == 1) & (tokens[:samples * window] != pad)
    labels = mask[1:samples * window + 1].reshape(samples, window)   # sample i's labels
    many, after = 0, 0
    for sample, row in enumerate(begins.reshape(samples, window)):
        found = np.flatnonzero(row)
        if len(found) > 1:
            many += 1
            after += int(labels[sample, found[1] - 1:].sum())
    return many / samples, after / max(int(labels.sum()), 1)


def shared_arm(common: list[str], steps: list[str], fresh: Path, isolated: Path, seeds: int) -> list[float]:
    """Each seed's KD run on the conversations packed with attention crossing (its own data and
    cache, the same corrected teacher and student), scored alone by the eval stage on ``isolated``."""
    data = [f"data.output={fresh / 'shared_data'}", "data.chat.packing=shared"]
    cache = fresh / "shared_logits"
    print("[chat_distill] the same conversations packed with attention crossing: data and cache", flush=True)
    stage("prepare", [*common, *data])
    stage("logits", [*common, *data, f"logits.output={cache}"])   # the run's teacher: corrected
    found = []
    for seed in range(1, seeds + 1):
        output = fresh / f"kd_shared_{seed}"
        stage("distill", [*common, *steps, *data, f"distill.cache={cache}", f"distill.data_seed={seed}",
                          f"distill.output={output}", "distill.log_interval=1000", "distill.keep_final_checkpoint=false"])
        scored = fresh / f"kd_shared_{seed}_eval"
        stage("eval", [*common, f"data.output={isolated}", f"eval.model={output}", f"eval.output={scored}",
                       "eval.name=kd_shared", "eval.val_samples=${distill.eval_samples}", "eval.mmlu.enabled=false",
                       "eval.corpus.enabled=false", "eval.generate.prompts=[]"])
        found.append(json.loads((scored / "results.json").read_text())["val_loss"])
        print(f"[chat_distill] seed {seed} kd_shared: trained with attention crossing, scored alone {found[-1]:.4f} "
              f"(its own validation, crossing: {read(output)['final']['val_loss']:.4f})", flush=True)
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
