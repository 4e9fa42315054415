"""Quantization-aware distillation (``distill.quantize=<format>``): the student trains fake-quantized.

The distill stage hands :class:`FakeQuantization` to the trainer, which calls :meth:`apply` on the
megatron-core student before its DDP and optimizer are built: ModelOpt's ``mtq.quantize`` puts
its quantizers on every linear layer (its megatron plugin: the column- and row-parallel layers)
and calibrates their ranges (and AWQ's or SmoothQuant's input scales) on the first
``quantize.calib_samples`` training sequences, the same on every rank. Training then runs through
the fake quantization, straight-through for the gradients, so the weights learn around the
format's rounding, from the run's one teacher cache (no second teacher pass). The ranges are
buffers, fixed after calibration, as in ModelOpt's and Megatron-Bridge's QAD; the training
checkpoints carry them (``dist_checkpointing``), and a resumed run calibrates again only to build
the buffers that the checkpoint then overwrites.

The student written at the end is a plain model (:meth:`plain_model`): AWQ's and SmoothQuant's
input scales are folded into the weights, which computes the same function without the
quantizers, and those weights are copied into a model built without them (ModelOpt's layers name
their tensors per layer in megatron's sharded state dict, where a plain model stacks the layers),
so the final student is an ordinary checkpoint: one more copy of the student's weights on each
rank while it is written.
The quantize stage then quantizes it as any student (``make quantize``, the same format), with
the ranges calibrated again on the trained weights.
"""

from __future__ import annotations

import torch

from pipelines.core.errors import require
from pipelines.model.build import local_logits
from pipelines.quantization.ptq import FORMATS, check_formats, group_size, modelopt_config


def check(cfg, section: str, on_gpu: bool) -> str | None:
    """``<section>.quantize``: null, or one format of :data:`~pipelines.quantization.ptq.FORMATS`
    that runs here; only a distilled student, with one pipeline stage."""
    value = cfg[section].get("quantize")
    if value is None:
        return None
    key = f"{section}.quantize"
    require(section == "distill", "quantization-aware training is for the distilled student, not the "
            "teacher's correction: set it to null", key)
    require(isinstance(value, str), f"{key}={value!r}: one format, one of {', '.join(FORMATS)}", key)
    fmt = check_formats([value], on_gpu, key)[0]
    require(int(cfg.parallel.pipeline) == 1, "quantization-aware distillation calibrates with whole "
            "forward passes: run it with parallel.pipeline=1", key)
    return fmt


class FakeQuantization:
    """ModelOpt's fake quantization in ``fmt`` on a megatron-core student (see the module doc)."""

    def __init__(self, fmt: str, calibration: list[tuple], layout, group: int = 128):
        """``group``: the INT4 block size (:func:`~pipelines.quantization.ptq.group_size`)."""
        self.fmt, self.layout, self.calibration, self.group = fmt, layout, calibration, group

    @classmethod
    def from_config(cls, cfg, plan, layout) -> "FakeQuantization | None":
        """From ``distill.quantize`` (null: None), calibrating on ``quantize.calib_samples``
        training sequences of the run's sequence length, ``quantize.batch_size`` at a time, with
        the quantize stage's INT4 blocks (``quantize.group_size``), so that the export later
        quantizes as the student trained."""
        fmt = check(cfg, plan.section, layout.device.type == "cuda")
        if fmt is None:
            return None
        samples, batch = int(cfg.quantize.calib_samples), int(cfg.quantize.batch_size)
        require(plan.samples >= samples, f"the training split holds {plan.samples} sequences of "
                f"{plan.sequence_length} tokens, fewer than quantize.calib_samples={samples}",
                "quantize.calib_samples")
        batches = list(plan.windows.input_batches(batch, samples))
        group = group_size(cfg.quantize.group_size, plan.arch) if FORMATS[fmt][2] == 4 else 128
        return cls(fmt, batches, layout, group)

    def apply(self, model) -> None:
        """Insert and calibrate the quantizers (the model in place)."""
        import modelopt.torch.quantization as mtq

        def forward_loop(module):
            with torch.no_grad():
                for tokens, starts in self.calibration:
                    local_logits(module, self.layout.place(tokens), starts)

        was_training = model.training
        model.eval()
        mtq.quantize(model, modelopt_config(self.fmt, self.group), forward_loop)
        model.train(was_training)

    def plain_model(self, model, arch, dtype: torch.dtype):
        """A model without quantizers holding ``model``'s trained weights (folded by :meth:`fold`)."""
        from pipelines.model import build

        self.fold(model)
        layout = self.layout
        config = build.transformer_config(arch, dtype, layout.tensor_parallel, layout.pipeline_parallel,
                                          layout.context_parallel, device=layout.device)
        plain = build.build(arch, config, initialize=False)
        missing, unexpected = plain.load_state_dict(
            {k: v for k, v in model.state_dict().items() if "_quantizer." not in k}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        require(not missing and not unexpected, f"the quantization-aware student's weights do not fit its "
                f"architecture: missing {missing[:4]}, unexpected {unexpected[:4]}", "distill.quantize")
        return layout.place_module(plain)

    @staticmethod
    def fold(model) -> None:
        """Fold AWQ's and SmoothQuant's input scales into their layers' weights and switch the
        quantizers off: the model then computes the trained function without quantization."""
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.model_calib import disable_pre_quant_scale_and_resmooth

        with torch.no_grad():
            for module in model.modules():
                quantizer = getattr(module, "input_quantizer", None)
                if quantizer is not None and getattr(quantizer, "_enable_pre_quant_scale", False) \
                        and hasattr(quantizer, "_pre_quant_scale"):
                    disable_pre_quant_scale_and_resmooth(module, delete_pre_quant_scale=True)
        mtq.disable_quantizer(model, "*")
