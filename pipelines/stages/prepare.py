"""The prepare stage: tokenize the experiment's corpus (``scripts/prepare.py``, ``make prepare``).

A corpus (Jane Austen's novels from Debian's ``r-cran-janeaustenr``, plain text or JSONL files,
or a Hugging Face ``datasets`` dataset) is split into documents, tokenized by worker processes
with an end-of-document token appended, and written as megatron-core indexed datasets
(``train.bin/.idx`` and ``valid.bin/.idx``) plus a manifest. :class:`TokenWindows` reads them
back as fixed-length samples in a deterministic order, for calibration, teacher logits, distill
and eval alike.

The corpus readers, the tokenizer and :class:`~pipelines.data.corpus.TokenWindows` live in
:mod:`pipelines.data.corpus`; this module is the stage: its inputs, its checks and its run.
"""

from __future__ import annotations

from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipelines.core.artifacts import config_hash, sha256_file
from pipelines.core.errors import require
from pipelines.data.corpus import encode_document, init_worker, is_valid, read_documents, train_tokenizer
from pipelines.stages.base import Stage
from pipelines.stages.rules import data_ranges


CHAT_LEFT_OUT_WHEN_OFF = {"role_map": None, "too_long": "drop"}


def prepare_inputs(cfg) -> dict:
    """The data section, and the content of the corpus files it names (an edited file reruns), or
    the sizes and times of a local ``data.hf_name`` folder's files."""
    chat = str(cfg.data.source) == "chat"   # its keys stay out of other sources' stamps (no rerun for them)
    section = {k: v for k, v in dict(cfg.data).items() if chat or k not in ("chat", "chat_template")}
    if chat:   # keys added after data was stamped stay out at their off values: that data is still up to date
        section["chat"] = OmegaConf.create({k: v for k, v in cfg.data.chat.items()
                                            if not (k in CHAT_LEFT_OUT_WHEN_OFF and v == CHAT_LEFT_OUT_WHEN_OFF[k])})
    inputs = {"data": config_hash(section), "tokenizer": str(cfg.data.tokenizer)}
    files = [Path(str(f)) for f in (cfg.data.get("files") or [])]
    if files:   # a missing one is named by read_documents
        inputs["files"] = {str(f): sha256_file(f) if f.is_file() else None for f in files}
    local = Path(str(cfg.data.hf_name)) if cfg.data.get("hf_name") and str(cfg.data.source) in ("hf", "chat") else None
    if local is not None and local.is_dir():   # a local data set: its files' sizes and times (it may be large)
        inputs["hf_files"] = {str(f.relative_to(local)): [f.stat().st_size, f.stat().st_mtime_ns]
                              for f in sorted(local.rglob("*")) if f.is_file()}
    return inputs


def prepare(cfg, layout, staging: Path, inputs: dict) -> dict:
    """Tokenize ``cfg.data`` into ``staging`` (train/valid indexed datasets); the manifest's fields."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    data_cfg = cfg.data
    output = Path(str(data_cfg.output))
    if str(data_cfg.source) == "chat":
        return prepare_chat(cfg, staging)
    documents = read_documents(data_cfg, Path(str(cfg.paths.data)) / "cache")
    require(len(documents) > 1, "the corpus has fewer than 2 documents", "data.source")
    tokenizer_dir = Path(str(data_cfg.tokenizer))
    if data_cfg.train_tokenizer_vocab:
        tokenizer_dir = train_tokenizer(documents, int(data_cfg.train_tokenizer_vocab), staging / "tokenizer")
    require((tokenizer_dir / "tokenizer_config.json").exists() or (tokenizer_dir / "tokenizer.json").exists(),
            f"no tokenizer in {tokenizer_dir}", "data.tokenizer")
    builders = {split: IndexedDatasetBuilder(str(staging / f"{split}.bin"), dtype=np.int32)
                for split in ("train", "valid")}
    counts = {"train": [0, 0], "valid": [0, 0]}
    top = -1
    with Pool(int(data_cfg.workers), init_worker, (str(tokenizer_dir),)) as pool:
        encoded = pool.imap(encode_document, documents, chunksize=16)
        for document, ids in tqdm(zip(documents, encoded), total=len(documents),
                                  desc="[prepare] tokenizing", mininterval=2):
            split = "valid" if is_valid(document, float(data_cfg.valid_fraction)) else "train"
            builders[split].add_item(torch.from_numpy(ids))
            top = max(top, int(ids.max()) if len(ids) else -1)
            builders[split].end_document()
            counts[split][0] += 1
            counts[split][1] += len(ids)
    for split, builder in builders.items():
        require(counts[split][0] > 0, f"the {split} split is empty", "data.valid_fraction")
        builder.finalize(str(staging / f"{split}.idx"))
    final_tokenizer = output / "tokenizer" if data_cfg.train_tokenizer_vocab else tokenizer_dir
    used = (staging / "tokenizer" if data_cfg.train_tokenizer_vocab else tokenizer_dir) / "tokenizer.json"
    fields = {"tokenizer": str(final_tokenizer), "documents": {s: c[0] for s, c in counts.items()},
              "tokens": {s: c[1] for s, c in counts.items()}, "max_token_id": top,
              "tokenizer_sha256": sha256_file(used) if used.exists() else None}
    print(f"[prepare] {output}: tokens {fields['tokens']}, documents {fields['documents']}")
    return fields


def prepare_chat(cfg, staging: Path) -> dict:
    """Render ``cfg.data``'s conversations (:mod:`pipelines.data.chat`) into packed train/valid
    token datasets with their loss masks (``<split>.mask``) and where each conversation begins
    (``<split>.starts``), one byte a token each; the manifest's fields."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pipelines.data.chat import PACKING, TOO_LONG, Renderer, load_template, pack, read_conversations
    from pipelines.data.corpus import austen_documents, fetch_austen

    data_cfg = cfg.data
    chat, window = data_cfg.chat, int(data_cfg.chat.sequence_length)
    packing = str(chat.get("packing", PACKING[0]))   # both checked by the stage's checks (rules.data_ranges)
    too_long = str(chat.get("too_long", TOO_LONG[0]))
    truncate = too_long == "truncate"
    tokenizer_dir = Path(str(data_cfg.tokenizer))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    load_template(tokenizer, data_cfg)
    conversations = read_conversations(data_cfg, lambda: austen_documents(fetch_austen(Path(str(cfg.paths.data)) / "cache")))
    require(len(conversations) > 1, "the chat data holds fewer than 2 conversations", "data.files")
    render = Renderer(tokenizer, str(chat.loss_on))
    items = {"train": [], "valid": []}
    stats = {split: {"conversations": 0, "too_long": 0, "tokens": 0, "loss_tokens": 0, "padding": 0}
             for split in items}
    for where, messages in tqdm(conversations, desc="[prepare] rendering", mininterval=2):
        ids, mask = render(messages, where)
        split = "valid" if is_valid(json.dumps(messages, sort_keys=True), float(data_cfg.valid_fraction)) else "train"
        if len(ids) > window:
            stats[split]["too_long"] += 1
            if not truncate:
                continue
            ids, mask = ids[:window], mask[:window]
        items[split].append((ids, mask))
        stats[split]["conversations"] += 1
        stats[split]["tokens"] += len(ids)
        stats[split]["loss_tokens"] += int(mask.sum())
    top = -1
    pad = int(tokenizer.eos_token_id)
    for split, kept in items.items():
        require(kept, f"the {split} split has no conversation of at most {window} tokens "
                f"({stats[split]['too_long']} longer ones dropped; data.chat.too_long=truncate keeps them cut)",
                "data.chat.sequence_length")
        require(stats[split]["loss_tokens"] > 0, f"the {split} split's loss mask (loss_on={chat.loss_on}) leaves no "
                "token to train on", "data.chat.loss_on")
        builder = IndexedDatasetBuilder(str(staging / f"{split}.bin"), dtype=np.int32)
        with open(staging / f"{split}.mask", "wb") as masks, open(staging / f"{split}.starts", "wb") as begins:
            for ids, mask, starts in pack(kept, window, pad, one=packing == "one"):
                builder.add_item(torch.from_numpy(ids))
                builder.end_document()
                masks.write(mask.tobytes())
                begins.write(starts.tobytes())
                top = max(top, int(ids.max()))
        builder.finalize(str(staging / f"{split}.idx"))
        written = (staging / f"{split}.mask").stat().st_size
        stats[split]["padding"] = written - stats[split]["tokens"]
        stats[split]["loss_share"] = stats[split]["loss_tokens"] / stats[split]["tokens"]
    used = tokenizer_dir / "tokenizer.json"
    fields = {"tokenizer": str(tokenizer_dir), "documents": {s: v["conversations"] for s, v in stats.items()},
              "tokens": {s: v["tokens"] + v["padding"] for s, v in stats.items()}, "max_token_id": top,
              "tokenizer_sha256": sha256_file(used) if used.exists() else None,
              "chat": {"window": window, "loss_on": str(chat.loss_on), "packing": packing, "too_long_action": too_long,
                       "view": chat.get("view"), **stats}}
    for split, v in stats.items():
        print(f"[prepare] {split}: {v['conversations']} conversations, {v['tokens']:,} tokens ({v['padding']:,} padding), "
              f"{100 * v['loss_share']:.1f}% of them {chat.loss_on} tokens; {v['too_long']} longer than {window} "
              f"tokens {'truncated' if truncate else 'dropped'}", flush=True)
    return fields


def checks(cfg, arch, layout) -> None:

    data_ranges(cfg.data)


STAGE = Stage(name="prepare", output=lambda cfg: Path(str(cfg.data.output)), inputs=prepare_inputs, run=prepare,
              checks=checks, runtime=None, output_key="data.output")
