"""Post-training quantization with ModelOpt and the serving checkpoints it exports.

:mod:`~pipelines.quantization.ptq` quantizes a Hugging Face model (calibrated on the run's own
tokens) and exports ModelOpt's unified Hugging Face layout; :mod:`~pipelines.quantization.load`
reads that layout back as a fake-quantized model, so evaluation scores what is shipped.
"""
