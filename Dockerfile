# GPU image: NVIDIA's PyTorch container for its CUDA build of torch, transformer-engine (TE), apex
# and NCCL, with megatron-core and ModelOpt at the versions this code is tested with (requirements.txt).
#
# Why this base. megatron-core 0.16.1 declares transformer-engine>=2.9,<2.12 and torch>=2.6
# (its pyproject.toml), and Megatron-LM's own CI for its 0.16 branch builds on pytorch:25.11-py3
# (docker/.ngc_version.dev on core_r0.16.0). The NeMo Framework images do not fit: nemo:25.09 carries
# megatron-core 0.14, TE 2.7, ModelOpt 0.35 and torch 2.8, and installing megatron-core 0.16.1 over it
# with --no-deps leaves TE 2.7 under it. ModelOpt 0.43.0 needs torch>=2.6 and no TE (0.44+ imports TE
# unconditionally, which is why it stays pinned).
#
# The build stops unless the versions fit: the last RUN imports the packages as a stage will and runs
# the start-up check (pipelines/backend/distributed.py: check_versions), which compares megatron-core's
# and ModelOpt's installed and *imported* versions (an NGC image's /opt source checkouts can shadow an
# installed package) and TE's against megatron-core's declared range. Not built in CI (no GPU registry
# access there); build it with `docker build -t pipelines .` and convert it for pyxis with
# `enroot import dockerd://pipelines`, then set cluster.container_image to the .sqsh file.
FROM nvcr.io/nvidia/pytorch:25.11-py3

# NGC images pin their own packages through a pip constraint file; Megatron-LM's CI Dockerfile clears
# it the same way, or pip refuses the pinned megatron-core and ModelOpt.
ENV PIP_CONSTRAINT="" \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/pipelines
COPY requirements.txt pyproject.toml ./
# --no-deps keeps the container's torch and TE; ModelOpt's other dependencies (its package metadata:
# ninja, nvidia-ml-py, pulp, pydantic, regex, rich, scipy) are installed by name. numpy and pyarrow
# stay the container's (numpy 2, which its compiled packages are built against; requirements.txt pins
# numpy<2 only for the CPU setup's pyarrow).
RUN pip install --no-cache-dir --no-deps \
      "$(grep -E '^megatron-core==' requirements.txt)" "$(grep -E '^nvidia-modelopt==' requirements.txt)" \
 && pip install --no-cache-dir ninja nvidia-ml-py pulp pydantic regex rich scipy \
 && grep -vE '^(megatron-core|nvidia-modelopt|numpy|pyarrow)([=<>!~ ]|$)' requirements.txt > /tmp/requirements-container.txt \
 && pip install --no-cache-dir -r /tmp/requirements-container.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "from pipelines.backend.distributed import check_versions; \
[print(name, version, path) for name, (version, path) in check_versions().items()]"
