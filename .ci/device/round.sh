#!/usr/bin/env bash
# One prepared round on a lent GPU machine (the `device` tool): what to measure there, in one call.
#
#   here:   bash .ci/device/wheels.sh      # once: the wheels the GPU image lacks, into .whl/
#           make prepare                   # once, if data/ is missing (the demo corpus and its source)
#   there:  run(command="bash .ci/device/round.sh", carry=[".whl", "data"], timeout_s=600)
#           run(command="bash .ci/device/round.sh vs_random slice", ...)   # only the parts named
#
# The machine reaches no network and runs its image's python3 (3.12, torch 2.11 + CUDA 13): the
# wheels are installed into /tmp/site, ahead of the image's packages. Each part runs under its own
# time limit, cut to what is left of the round's (ROUND_SECONDS, 540 by default: the run's limit is
# 600 and a machine's start counts against the session's device time too), in the order given, the
# most telling first; a part that would get under 20 s is skipped. Logs and figures go to $OUT (what
# the tool brings back: at most 8 files): one line per part in summary.txt (status, seconds, last
# line), a log per benchmark, gpu-check's parts in one log, its result.json as gpu_check.json. The parts:
#   env           GPU, driver, versions; whether torch's mixed-dtype GEMM (bf16 in, float32 out, as
#                 apex's weight-gradient kernel) runs on this GPU: pipelines.backend.distributed has no use for it yet
#   tiny          gpu-check's tiny pipeline end to end in bf16 (every stage's GPU path)
#   vs_random     bench/vs_transformers.py --random: #14's three ratios at SmolLM2-135M's shape
#   distill_step  bench/distill_step.py --real: cache KD and online KD against a CE step
#   slice         gpu-check's 8B-width slice: tokens/s and peak memory against the memory plan
#   vs_large      vs_random at 16 x 1024 tokens a step, where the GPU's arithmetic, not the host, sets
#                 the pace (4 x 256, #14's shape, is a few hundred small kernels a step)
#   vs_host       bench/vs_transformers.py --host: the host's time per step
#   attention     gpu-check's attention at Llama-3.1-8B's shape, fused kernels only
# Without a GPU (QUICK=1, for trying the round on CPU) the benchmarks run their --quick modes and
# gpu-check's parts stop at once with status 2, as they do on any machine without one.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/device_round}
ROUND_SECONDS=${ROUND_SECONDS:-540}
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(env tiny vs_random distill_step slice vs_large vs_host attention)
QUICK_ARGS=()
LARGE_ARGS=(--batch 16 --sequence-length 1024)
[ -n "${QUICK:-}" ] && QUICK_ARGS=(--quick) && LARGE_ARGS=()
START=$SECONDS
mkdir -p "$OUT"
: > "$OUT/summary.txt"

if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > /tmp/install.log 2>&1 || { cp /tmp/install.log "$OUT/"; echo "install: failed (install.log)" | tee -a "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

part() {  # part NAME LOG LIMIT COMMAND...: run it under min(LIMIT, what is left); output onto $OUT/LOG.log
  local name=$1 log=$OUT/$2.log limit=$3; shift 3
  local left=$(( ROUND_SECONDS - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "$name: skipped, ${left} s of the round left" | tee -a "$OUT/summary.txt"
    return
  fi
  local began=$SECONDS status last
  timeout -k 10 "$limit" "$@" > /tmp/part.log 2>&1
  status=$?
  { echo "== $name"; cat /tmp/part.log; } >> "$log"
  last=$(grep -v -i -e warn -e '^\s*$' /tmp/part.log | tail -n 1 | cut -c1-400)
  [ $status = 124 ] && last="TIMED OUT after ${limit} s; last: $last"
  echo "$name: status $status in $(( SECONDS - began )) s (limit $limit): $last" | tee -a "$OUT/summary.txt"
}

environment() {
  nvidia-smi -L 2>&1 || echo "no nvidia-smi"
  "$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("megatron-core", "nvidia-modelopt", "transformers", "numpy", "hydra-core", "transformer-engine", "apex"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
    a = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(512, 384, device="cuda")
    try:
        expected = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        print("mixed-dtype addmm (bf16 in, float32 accumulated in place): runs, max error",
              f"{(c - expected).abs().max().item():.2e}")
    except Exception as error:  # what this probe is for: whether it runs at all
        print("mixed-dtype addmm: fails:", type(error).__name__, str(error)[:200])
EOF
}

export -f environment
export PYTHON
for name in "${PARTS[@]}"; do
  case $name in
    env)          part env env 30 bash -c environment ;;
    tiny)         part tiny gpu_check 170 "$PYTHON" scripts/gpu_check.py --part tiny ;;
    vs_random)    part vs_random vs_random 130 "$PYTHON" bench/vs_transformers.py --random "${QUICK_ARGS[@]}" ;;
    distill_step) part distill_step distill_step 100 "$PYTHON" bench/distill_step.py --real "${QUICK_ARGS[@]}" ;;
    slice)        part slice gpu_check 100 "$PYTHON" scripts/gpu_check.py --part slice ;;
    vs_large)     part vs_large vs_large 100 "$PYTHON" bench/vs_transformers.py --random "${LARGE_ARGS[@]}" "${QUICK_ARGS[@]}" ;;
    vs_host)      part vs_host vs_host 40 "$PYTHON" bench/vs_transformers.py --host "${QUICK_ARGS[@]}" ;;
    attention)    part attention gpu_check 60 "$PYTHON" scripts/gpu_check.py --part attention ;;
    *) echo "$name: no such part (env tiny vs_random distill_step slice vs_large vs_host attention)" | tee -a "$OUT/summary.txt" ;;
  esac
done
[ -f runs/gpu_check/result.json ] && cp runs/gpu_check/result.json "$OUT/gpu_check.json"
echo "round: $(( SECONDS - START )) s; $OUT holds $(ls "$OUT" | wc -l) files" | tee -a "$OUT/summary.txt"
