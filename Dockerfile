# GPU image: NVIDIA's NeMo Framework container already holds torch, megatron-core,
# transformer-engine, apex and ModelOpt built for its CUDA. Install this project *without*
# replacing any of them: the same requirements as `make setup`, minus torch, megatron-core and
# ModelOpt (the container's versions win).
# Not built in CI (no GPU registry access there).
FROM nvcr.io/nvidia/nemo:25.09

WORKDIR /workspace/pipelines
COPY requirements.txt pyproject.toml ./
RUN grep -vE '^(megatron-core|nvidia-modelopt)' requirements.txt > /tmp/requirements-container.txt \
 && pip install --no-cache-dir -r /tmp/requirements-container.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
