"""Teacher soft labels computed once: a compact, checksummed, resumable cache of k ids per token
(sampled, or the top k with the tail mass).

Layout of a cache folder (the logits stage, ``scripts/logits.py``, writes it)::

    shard-00000.bin     samples [0, S) : for each sample, in order,
                          ids      ceil(s*k*id_bits/8) bytes, top-k ids bit-packed (little-endian bits)
                          logprobs s*k float16, top-k log-probabilities at the temperature
                          tail     s   float16, log of the probability mass outside the top-k
                        (values are float32 with ``logits.value_dtype=float32``, for checks)
    shard-00000.sha256  the shard's sha256 and the sample range it holds, "<hex> <first> <end>"
                        (written atomically after the shard, before the manifest)
    manifest.json       what the cache is valid for (teacher, data, sequence length, k,
                        temperature, tokenizer), the layout numbers, and every shard's sha256;
                        written last

Every sample has the same byte size, so sample ``i`` is read with one memory-mapped slice.
A shard is written under a temporary name and renamed, so a killed run leaves only complete
shards, and a rerun computes just the missing ones: a shard counts as finished only when its
recorded range is the one this run assigns it, so a changed ``logits.samples`` recomputes the
last, partial shard instead of reusing it.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from pipelines.core.artifacts import fsync_folder, read_manifest, sha256_file
from pipelines.core.errors import UserError, require


def id_bits(vocab_size: int) -> int:
    """Bits per token id: 17 for Llama-3's 128,256."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_planes(ids: np.ndarray, bits: int) -> np.ndarray:
    planes = ((ids[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative ids into ``bits`` bits each (uint8 array, little-endian bit order).

    Bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``; id ``n`` occupies stream bits
    ``[n*bits, (n+1)*bits)``, least significant first. Every 8 ids fill exactly ``bits`` bytes,
    so for ``bits >= 8`` each output byte is cut from at most two ids: ``bits`` vector operations.
    """
    ids = ids.astype(np.uint64).reshape(-1)
    count = ids.size
    if bits < 8:
        return pack_planes(ids, bits)
    groups = np.zeros((-(-count // 8), 8), dtype=np.uint64)
    groups.reshape(-1)[:count] = ids
    out = np.empty((groups.shape[0], bits), dtype=np.uint8)
    for byte in range(bits):
        first, offset = divmod(8 * byte, bits)
        value = groups[:, first] >> np.uint64(offset)
        if offset + 8 > bits and first + 1 < 8:
            value |= groups[:, first + 1] << np.uint64(bits - offset)
        out[:, byte] = (value & np.uint64(0xFF)).astype(np.uint8)
    return out.reshape(-1)[: -(-count * bits // 8)]


def unpack_ids(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``count`` ids as int64."""
    if bits < 8:
        planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
        return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(-1)
    groups = -(-count // 8)
    raw = np.zeros(groups * bits + 8, dtype=np.uint8)
    raw[: packed.size] = packed
    ids = np.empty((groups, 8), dtype=np.int64)
    mask = np.uint64((1 << bits) - 1)
    for k in range(8):
        start, shift = divmod(k * bits, 8)
        value = np.zeros(groups, dtype=np.uint64)
        for i in range((shift + bits + 7) // 8):
            value |= raw[start + i: start + i + groups * bits: bits][:groups].astype(np.uint64) << np.uint64(8 * i)
        ids[:, k] = ((value >> np.uint64(shift)) & mask).astype(np.int64)
    return ids.reshape(-1)[:count]


class Layout:
    """Byte layout of one sample."""

    VALUE_DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}

    def __init__(self, sequence_length: int, k: int, vocab_size: int, value_dtype: str = "float16"):
        require(value_dtype in self.VALUE_DTYPES, f"value dtype {value_dtype!r}; one of "
                f"{tuple(self.VALUE_DTYPES)}", "logits.value_dtype")
        self.sequence_length, self.k, self.bits = sequence_length, k, id_bits(vocab_size)
        self.value_dtype = value_dtype
        self.torch_dtype, self.numpy_dtype = self.VALUE_DTYPES[value_dtype]
        self.value_bytes = np.dtype(self.numpy_dtype).itemsize
        self.id_bytes, self.logprob_bytes, self.tail_bytes = self.parts(sequence_length)
        self.sample_bytes = self.id_bytes + self.logprob_bytes + self.tail_bytes

    def parts(self, positions: int) -> tuple[int, int, int]:
        """Bytes of the ids, log-probs and tail of ``positions`` stored positions."""
        return (math.ceil(positions * self.k * self.bits / 8), positions * self.k * self.value_bytes,
                positions * self.value_bytes)

    def size(self, positions: int) -> int:
        return sum(self.parts(positions))

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor) -> bytes:
        """One sample ([s, k] ids and log-probs, [s] tail) as bytes."""
        parts = [pack_ids(ids.cpu().numpy(), self.bits).tobytes(),
                 logprobs.to(self.torch_dtype).cpu().numpy().tobytes(),
                 tail.to(self.torch_dtype).cpu().numpy().tobytes()]
        return b"".join(parts)

    def decode(self, raw: np.ndarray, positions: int | None = None):
        """One sample's arrays; ``positions``: how many it stores (a masked cache's sample), else ``s``."""
        s, k = self.sequence_length if positions is None else positions, self.k
        id_bytes, logprob_bytes, _ = self.parts(s)
        ids = unpack_ids(raw[: id_bytes], self.bits, s * k).reshape(s, k)
        offset = id_bytes
        logprobs = raw[offset: offset + logprob_bytes].view(self.numpy_dtype).reshape(s, k)
        tail = raw[offset + logprob_bytes: offset + logprob_bytes + s * self.value_bytes].view(self.numpy_dtype)
        return (torch.from_numpy(ids), torch.from_numpy(logprobs.astype(np.float32)),
                torch.from_numpy(tail.astype(np.float32)))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def write_shard(folder: Path, index: int, samples: list[bytes], first: int | None = None) -> str:
    """Write one shard atomically, then its checksum file (also atomic), both fsynced with their
    folder; return the sha256.

    ``first``: the index of the shard's first sample (recorded with the checksum)."""
    path = folder / shard_name(index)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    with open(temporary, "wb") as handle:
        for sample in samples:
            handle.write(sample)
            digest.update(sample)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    first = 0 if first is None else first
    sidecar = folder / f"shard-{index:05d}.sha256"
    temporary = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(f"{digest.hexdigest()} {first} {first + len(samples)}")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, sidecar)
    fsync_folder(folder)   # both renames durable: a shard is never listed without its checksum
    return digest.hexdigest()


def _sidecar(folder: Path, index: int) -> tuple[str, int, int] | None:
    path = folder / f"shard-{index:05d}.sha256"
    if not path.exists() or not (folder / shard_name(index)).exists():
        return None
    parts = path.read_text().split()
    if len(parts) != 3:  # written by an older version, without its range: not trusted
        return None
    return parts[0], int(parts[1]), int(parts[2])


def finished_shards(folder: Path, samples: int | None = None, samples_per_shard: int | None = None) -> set[int]:
    """Shards already complete from an earlier run; with ``samples`` and ``samples_per_shard``,
    only those holding exactly the range this run assigns them."""
    found = set()
    for path in folder.glob("shard-*.sha256"):
        index = int(path.stem.split("-")[1])
        recorded = _sidecar(folder, index)
        if recorded is None:
            continue
        if samples is not None:
            first = index * samples_per_shard
            if recorded[1:] != (first, min(first + samples_per_shard, samples)):
                continue
        found.add(index)
    return found


def cache_manifest(folder: Path, identity: dict, layout: Layout, samples: int, samples_per_shard: int,
                   **facts) -> dict:
    """The manifest's fields once every shard exists; ``facts`` (e.g. ``teacher_path``) join them."""
    shards = math.ceil(samples / samples_per_shard)
    missing = sorted(set(range(shards)) - finished_shards(folder, samples, samples_per_shard))
    require(not missing, f"cache {folder} lacks shards {missing[:5]}", "logits")
    return {**facts, "identity": identity, "samples": samples,
                "samples_per_shard": samples_per_shard, "sequence_length": layout.sequence_length,
                "k": layout.k, "id_bits": layout.bits, "value_dtype": layout.value_dtype,
                "sample_bytes": layout.sample_bytes,
                "shards": {shard_name(i): _sidecar(folder, i)[0] for i in range(shards)}}


# the manifest's stage name (caches written before the stage names were unified say teacher_logits)
CACHE_STAGES = ("logits", "teacher_logits")


class LogitsCache:
    """Random access by sample index to a finished cache, checked against what the run expects.

    A cache of conversations (``masked`` in its manifest) stores each sample's labels only where
    the data's loss mask counts them: sample ``i`` holds ``n_i`` positions, the mask's count over
    its labels, so it is read with the data's windows (``windows``); the positions the mask leaves
    out come back as a uniform distribution over ``k`` ids (finite, and weighted 0 by the loss)."""

    def __init__(self, folder: Path, expected_identity: dict | None = None, verify: bool = True, windows=None):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        require(manifest is not None and manifest.get("stage") in CACHE_STAGES,
                f"{self.folder} is not a finished teacher-logits cache", "distill.cache")
        for key, value in (expected_identity or {}).items():
            cached = manifest["identity"].get(key)
            if cached != value:
                raise UserError(f"teacher-logits cache {self.folder} was made for {key}={cached!r}, "
                                f"this run has {value!r}; recompute it (make logits)", "distill.cache")
        self.manifest, self.verify = manifest, verify
        self.layout = Layout(manifest["sequence_length"], manifest["k"], 2 ** manifest["id_bits"],
                             manifest.get("value_dtype", "float16"))
        self._maps: dict[int, np.memmap] = {}
        self.windows, self.counts, self.offsets = None, None, None
        if manifest.get("masked"):
            require(windows is not None and windows.masked, f"the cache {self.folder} holds the labels of masked "
                    "tokens only, and this run's data has no loss mask", "distill.cache")
            self.windows = windows
            self.counts = windows.mask_counts(len(self))
            sizes = np.asarray([self.layout.size(int(n)) for n in self.counts], dtype=np.int64)
            per_shard = manifest["samples_per_shard"]
            self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)   # offsets[i]: where sample i-1 ends
            for start in range(0, len(sizes), per_shard):   # in its shard
                self.offsets[start + 1:start + per_shard + 1] = np.cumsum(sizes[start:start + per_shard])

    def __len__(self) -> int:
        return self.manifest["samples"]

    def _shard(self, index: int) -> np.memmap:
        if index not in self._maps:
            path = self.folder / shard_name(index)
            require(path.exists(), f"cache shard {path} is missing", "distill.cache")
            if self.verify and sha256_file(path) != self.manifest["shards"][path.name]:
                raise UserError(f"cache shard {path} is corrupted (checksum mismatch); delete it "
                                "and rerun the teacher-logits stage to recompute it", "distill.cache")
            self._maps[index] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[index]

    def __getitem__(self, sample: int):
        """``(ids [s, k] int64, logprobs [s, k] float32, tail [s] float32)`` of one sample."""
        per_shard = self.manifest["samples_per_shard"]
        shard = self._shard(sample // per_shard)
        if self.counts is None:
            start = (sample % per_shard) * self.layout.sample_bytes
            return self.layout.decode(np.asarray(shard[start: start + self.layout.sample_bytes]))
        start = int(self.offsets[sample]) if sample % per_shard else 0   # within its shard
        count = int(self.counts[sample])
        ids, logprobs, tail = self.layout.decode(np.asarray(shard[start: start + self.layout.size(count)]), count)
        s, k = self.layout.sequence_length, self.layout.k
        where = self.windows.loss_mask(sample).bool()
        full_ids = torch.arange(k, dtype=torch.int64).expand(s, k).clone()
        full_logprobs = torch.full((s, k), -math.log(k), dtype=torch.float32)
        full_tail = torch.full((s,), float("-inf"), dtype=torch.float32)
        full_ids[where], full_logprobs[where], full_tail[where] = ids, logprobs, tail
        return full_ids, full_logprobs, full_tail
