"""Load a checkpoint at a tensor-parallel size and save the gathered logits (launched by torchrun).

    python -m torch.distributed.run --nproc-per-node=2 tests/workers/tp_logits.py CKPT TOKENS OUT TP
"""

import sys

import torch
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits

folder, tokens_path, output_path, tensor = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
layout = distributed.initialize(OmegaConf.create({"tensor": tensor, "pipeline": 1}))
model, arch = checkpoint.load_model(folder, layout)
# every split weight carries megatron's marks (the gradient norm counts a shard per rank by them)
from megatron.core.tensor_parallel import layers  # noqa: E402

split = [name for name, module in model.named_modules()
         if isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear, layers.VocabParallelEmbedding))
         and isinstance(getattr(module, "weight", None), torch.nn.Parameter)]
unmarked = [name for name in split if not getattr(model.get_submodule(name).weight, "tensor_model_parallel", False)]
assert split and not unmarked, f"split weights without tensor_model_parallel: {unmarked[:4]}"
with torch.no_grad():
    logits = forward_logits(model.eval(), torch.load(tokens_path))
if layout.is_main:
    torch.save(logits, output_path)
print(f"rank {layout.rank}: tp={layout.tensor_parallel} dp={layout.data_parallel} ok", flush=True)
distributed.shutdown()
