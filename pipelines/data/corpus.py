"""Corpora, tokenizers and tokenized datasets, read by every stage that reads data.

A corpus (Jane Austen's novels from Debian's ``r-cran-janeaustenr``, plain text or JSONL files,
or a Hugging Face ``datasets`` dataset) is split into documents and tokenized with an
end-of-document token appended (the prepare stage, :mod:`pipelines.stages.prepare`, writes them
as megatron-core indexed datasets). :class:`TokenWindows` reads them back as fixed-length
samples in a deterministic order, for calibration, teacher logits, distill and eval alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from pipelines.core.artifacts import read_manifest, sha256_file
from pipelines.core.errors import UserError, require
from pipelines.data import hub

AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def fetch_austen(cache: Path) -> Path:
    """Download and unpack ``r-cran-janeaustenr`` (no root needed); return the Rdata prefix."""
    prefix = cache / "janeaustenr" / AUSTEN_RDB
    if not Path(str(prefix) + ".rdb").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            download = ["apt-get", "download", "r-cran-janeaustenr"]
            result = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
            if result.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no apt lists
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                result = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("r-cran-janeaustenr*.deb"))
            require(bool(debs), "could not download the Debian package r-cran-janeaustenr "
                    f"({result.stderr.strip()[-200:]}); run 'apt-get update' first", "data.source")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(cache / "janeaustenr")], check=True)
    return prefix


def austen_documents(prefix: Path) -> list[str]:
    """Jane Austen's six novels as documents of consecutive paragraphs (about 1-2k characters)."""
    import rdata

    index = rdata.read_rds(str(prefix) + ".rdx")
    blob = Path(str(prefix) + ".rdb").read_bytes()
    documents = []
    for name in sorted(index["variables"]):
        offset, length = (int(x) for x in index["variables"][name])
        raw = zlib.decompress(blob[offset + 4: offset + length])  # 4-byte length, then zlib
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
        paragraphs = " ".join(str(line) if line else "\n" for line in lines).split("\n")
        current = ""
        for paragraph in (p.strip() for p in paragraphs):
            if paragraph:
                current = f"{current}\n{paragraph}" if current else paragraph
            if len(current) >= 1500:
                documents.append(current)
                current = ""
        if current:
            documents.append(current)
    return documents


def read_documents(data_cfg, cache: Path) -> list[str]:
    """The documents of the corpus that ``data_cfg.source`` names."""
    source = data_cfg.source
    if source == "austen":
        return austen_documents(fetch_austen(cache))
    if source in ("text", "jsonl"):
        require(bool(data_cfg.files), "no input files given", "data.files")
        documents = []
        for file in data_cfg.files:
            path = Path(str(file))
            require(path.exists(), f"data file {path} does not exist", "data.files")
            if source == "text":
                documents += [d for d in path.read_text().split("\n\n") if d.strip()]
            else:
                for number, line in enumerate(path.read_text().splitlines(), start=1):
                    if line.strip():
                        record = json.loads(line)
                        require(data_cfg.text_key in record, f"{path}:{number} has no "
                                f"'{data_cfg.text_key}' field", "data.text_key")
                        documents.append(record[data_cfg.text_key])
        return documents
    if source == "hf":
        dataset = hub.load_split(data_cfg, "data.source=hf")
        hub.column(dataset, str(data_cfg.text_key), "data.text_key")
        return [text for text in dataset[str(data_cfg.text_key)] if isinstance(text, str) and text.strip()]
    raise UserError(f"unknown data source {source!r} (austen, text, jsonl, hf)", "data.source")


def train_tokenizer(documents: list[str], vocab_size: int, output: Path) -> Path:
    """Train a byte-level BPE tokenizer on ``documents`` and save it as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|eos|>")
    output.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(output)
    return output


_worker_tokenizer = None


def init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from transformers import AutoTokenizer

    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def encode_document(document: str) -> np.ndarray:
    ids = _worker_tokenizer(document, add_special_tokens=False)["input_ids"]
    return np.asarray(ids + [_worker_tokenizer.eos_token_id], dtype=np.int32)


def is_valid(document: str, valid_fraction: float) -> bool:
    """Deterministic split by document content, stable under reordering or added documents."""
    digest = int.from_bytes(hashlib.sha256(document.encode()).digest()[:8], "little")
    return digest / 2**64 < valid_fraction


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length samples of ``sequence_length + 1`` tokens over one split, in file order.

    Sample ``i`` is tokens ``[i*s, i*s + s + 1)`` of the split's concatenated documents (they
    end with the end-of-document token), so the order is the same for every stage and run.

    Conversations (``data.source=chat``, :mod:`pipelines.data.chat`) carry a loss mask, one byte
    a token (``<split>.mask``): :meth:`loss_mask` is sample ``i``'s over its labels, and
    :attr:`masked` says there is one. They were packed whole into segments of the sequence length,
    so another length is refused. Packed with ``data.chat.packing=isolated``, each sample also says
    where its conversations begin (``<split>.starts``, one byte a token): :meth:`starts`, which the
    model reads to keep attention within each (:func:`pipelines.model.build.model_inputs`).
    """

    def __init__(self, folder: Path, split: str, sequence_length: int):
        prefix = Path(folder) / split
        require(Path(str(prefix) + ".bin").exists(), f"no tokenized {split} split in {folder}; "
                "run the prepare stage first (make prepare)", "data.output")
        self.tokens = np.memmap(str(prefix) + ".bin", dtype=np.int32, mode="r")
        self.mask, self.loss_on, self.begins = None, "all", None
        chat = (read_manifest(Path(folder)) or {}).get("chat")
        if chat:
            require(int(chat["window"]) == int(sequence_length), f"the conversations in {folder} are packed whole "
                    f"into {chat['window']} tokens, and this stage reads {sequence_length}: set its sequence_length "
                    f"to {chat['window']} (or prepare them with that length)", "data.chat.sequence_length")
            self.mask, self.loss_on = np.memmap(str(prefix) + ".mask", dtype=np.uint8, mode="r"), str(chat["loss_on"])
            require(len(self.mask) == len(self.tokens), f"{prefix}.mask does not match its tokens; prepare the data "
                    "again (make prepare FORCE=1)", "data.output")
            if chat.get("packing") == "isolated":
                self.begins = np.memmap(str(prefix) + ".starts", dtype=np.uint8, mode="r")
                require(len(self.begins) == len(self.tokens), f"{prefix}.starts does not match its tokens; prepare "
                        "the data again (make prepare FORCE=1)", "data.output")
        self.sequence_length = sequence_length
        self.count = (len(self.tokens) - 1) // sequence_length
        require(self.count > 0, f"{split} split has {len(self.tokens)} tokens, fewer than one "
                f"sequence of {sequence_length + 1}", "data.sequence_length")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.sequence_length
        return torch.from_numpy(np.array(self.tokens[start:start + self.sequence_length + 1],
                                         dtype=np.int64))

    @property
    def masked(self) -> bool:
        return self.mask is not None

    def loss_mask(self, index: int) -> torch.Tensor:
        """Sample ``index``'s loss mask over its ``s`` labels (float: 1 counts, 0 not)."""
        start = index * self.sequence_length
        return torch.from_numpy(np.array(self.mask[start + 1:start + self.sequence_length + 1], dtype=np.float32))

    @property
    def isolated(self) -> bool:
        """Whether the model keeps each packed conversation apart (``data.chat.packing=isolated``)."""
        return self.begins is not None

    def starts(self, index: int) -> torch.Tensor | None:
        """Where sample ``index``'s packed conversations begin, over its ``s`` inputs (bool; None
        unless they are kept apart: :attr:`isolated`)."""
        if self.begins is None:
            return None
        start = index * self.sequence_length
        return torch.from_numpy(np.array(self.begins[start:start + self.sequence_length], dtype=np.bool_))

    def stacked_starts(self, indices) -> torch.Tensor | None:
        """:meth:`starts` of these samples as one ``[b, s]`` batch (None unless :attr:`isolated`)."""
        return torch.stack([self.starts(i) for i in indices]) if self.isolated else None

    def mask_counts(self, samples: int) -> np.ndarray:
        """How many labels the loss mask counts in each of the first ``samples`` samples."""
        s = self.sequence_length
        total = np.concatenate([[0], np.cumsum(self.mask[: samples * s + 1], dtype=np.int64)])
        starts = np.arange(samples) * s
        return total[starts + s + 1] - total[starts + 1]

    def batches(self, batch_size: int, limit: int | None = None):
        """Consecutive ``[b, s+1]`` batches of the first ``limit`` samples."""
        total = min(self.count, limit or self.count)
        for start in range(0, total, batch_size):
            yield torch.stack([self[i] for i in range(start, min(start + batch_size, total))])

    def _batch_indices(self, batch_size: int, limit: int | None):
        total = min(self.count, limit or self.count)
        return (range(start, min(start + batch_size, total)) for start in range(0, total, batch_size))

    def mask_batches(self, batch_size: int, limit: int | None = None):
        """The loss masks ``[b, s]`` of :meth:`batches`' samples (None each, without a mask)."""
        for indices in self._batch_indices(batch_size, limit):
            yield torch.stack([self.loss_mask(i) for i in indices]) if self.masked else None

    def start_batches(self, batch_size: int, limit: int | None = None):
        """The conversation starts ``[b, s]`` of :meth:`batches`' samples (None each, unless :attr:`isolated`)."""
        return map(self.stacked_starts, self._batch_indices(batch_size, limit))

    def input_batches(self, batch_size: int, limit: int | None = None):
        """``(inputs [b, s], starts [b, s] or None)`` of :meth:`batches`' samples: what a forward
        pass reads (calibration), without the last label."""
        return zip((batch[:, :-1].contiguous() for batch in self.batches(batch_size, limit)),
                   self.start_batches(batch_size, limit))


def tokenizer_hash(folder: Path) -> str | None:
    """The SHA-256 of a checkpoint's ``tokenizer/tokenizer.json`` (None: it has none)."""
    path = Path(folder) / "tokenizer" / "tokenizer.json"
    return sha256_file(path) if path.exists() else None


def check_tokenized_for(data: Path, model: Path, vocab_size: int, key: str) -> None:
    """Refuse data that ``model`` cannot read: tokenized by another tokenizer than the model's (its
    ids would mean other tokens), or holding token ids beyond its vocabulary (an index error, on a
    GPU a device-side assert). Data or a model not there yet (an experiment checked before it runs)
    and data prepared before these were recorded pass."""
    manifest = read_manifest(data) if Path(data).is_dir() else None
    if manifest is None or not Path(model).is_dir():
        return
    theirs, ours = manifest.get("tokenizer_sha256"), tokenizer_hash(model)
    require(theirs is None or ours is None or theirs == ours,
            f"the data in {data} was tokenized with another tokenizer than {model}'s (tokenizer.json differs): "
            f"prepare it with the model's tokenizer (data.tokenizer={Path(model) / 'tokenizer'})", key)
    top = manifest.get("max_token_id")
    require(top is None or int(top) < int(vocab_size), f"the data in {data} holds token id {top}, beyond "
            f"{model}'s vocabulary of {vocab_size}: prepare it with the model's tokenizer", key)
