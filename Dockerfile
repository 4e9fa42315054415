# GPU image: NVIDIA's NeMo Framework container for its CUDA build of torch, transformer-engine and
# apex, with megatron-core and ModelOpt replaced by the versions this code is tested with
# (requirements.txt; pipelines/backend/distributed.py stops at start on any other version, naming these).
# --no-deps keeps the container's torch and transformer-engine; ModelOpt's other dependencies
# (its package metadata: ninja, nvidia-ml-py, pulp, pydantic, regex, rich, scipy) are installed by name.
# Not built in CI (no GPU registry access there).
FROM nvcr.io/nvidia/nemo:25.09

WORKDIR /workspace/pipelines
COPY requirements.txt pyproject.toml ./
RUN pip install --no-cache-dir --no-deps \
      "$(grep -E '^megatron-core==' requirements.txt)" "$(grep -E '^nvidia-modelopt==' requirements.txt)" \
 && pip install --no-cache-dir ninja nvidia-ml-py pulp pydantic regex rich scipy \
 && grep -vE '^(megatron-core|nvidia-modelopt)' requirements.txt > /tmp/requirements-container.txt \
 && pip install --no-cache-dir -r /tmp/requirements-container.txt \
 && python -c "from importlib.metadata import version as v; print('megatron-core', v('megatron-core'), 'modelopt', v('nvidia-modelopt'))"
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
