#!/usr/bin/env bash
# Every GPU check of the project in one run of a few minutes; figures land in $OUT (default gpu_out/).
#
#   scripts/gpu_pack.sh                      # here, once: the wheels the GPU machine lacks, into .whl/
#   scripts/gpu_check.sh                     # there (the device tool: carry .whl)
#
# 1. attention kernels (flash-attn if installed, SDPA backends) against SDPA's float32 math, UMT shapes;
#    and the kernels of packed rows (flash-attn varlen, torch varlen, FlexAttention document mask,
#    SDPA per sample) against float32 SDPA sample by sample, forward and gradients, at 32k tokens;
# 2. bf16 training steps of a VideoChat-Flash-2B-shaped random model under DeepSpeed ZeRO-3 over NCCL, one
#    sample per step and one packed row of 32k tokens (MFU with and without the vision FLOPs):
#    tokens/s, TFLOP/s, MFU, peak memory (scripts/gpu_check.py);
# 3. the long-video frame search at Qwen2-7B width, with and without the published visual dropout
#    (scripts/bench_long_video.py --device cuda --search);
# 4. the same search per KV-compression method: none, dropout, AdaReTaKe, Video-X2L, dropout + AdaReTaKe
#    (--kv --device cuda --search --yarn 4).
# Each step has its own time limit and a failure does not stop the others; record the figures, with the
# GPU name, in docs/PERFORMANCE.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; } \
  > "$OUT/env.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "rc=$?" >> "$OUT/$name.log"
    tail -n 4 "$OUT/$name.log"
}
step checks 300 torchrun --nproc_per_node 1 scripts/gpu_check.py --out "$OUT/checks.jsonl"
step long_video 150 python3 scripts/bench_long_video.py --device cuda --search
step kv_search 200 python3 scripts/bench_long_video.py --kv --device cuda --search --yarn 4
cat "$OUT/env.txt"
