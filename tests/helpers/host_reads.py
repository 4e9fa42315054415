"""Catch, on CPU, the operations that would make the host wait for a GPU.

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``if t:``,
``.tolist()``) or an operation whose output size depends on the data (``nonzero``, boolean-mask
indexing, ``masked_select``, ``unique``) waits for every kernel queued before it. Such a read
in the middle of a step stalls the kernels the host would otherwise launch ahead. CPU tensors
run the same aten operations, so a dispatch mode sees them here, including those called from
inside other operations (a boolean index reaching ``nonzero``). Not seen: ``.tolist()`` and
``.cpu()`` of a CPU tensor, which dispatch nothing there.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "repeat_interleave", "is_nonzero", "equal"}
BOOLEAN_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostReads(TorchDispatchMode):
    """Records each syncing aten operation run inside it (``reads``: their names, in order)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.reads.append(name)
        elif name in BOOLEAN_INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if len(args) > 1 else ()) or ()):
            self.reads.append(f"{name} (boolean mask)")   # counted by a nonzero on a GPU
        return func(*args, **(kwargs or {}))
