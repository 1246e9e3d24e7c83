#!/usr/bin/env bash
# The GPU check (issue 24): one prepared script, at most 8 minutes on one H100.
#   1. tests/gpu/steps.txt through tests/gpu/measure.py, in one process: every pruner, task=replace / task=search,
#      task=finetune and task=export on SmolLM2 and on Llama-3-8B's shape (2 layers) on CUDA, each with its peak
#      device memory (torch.cuda.max_memory_allocated) against the planner's prediction (metrics.json's plan);
#   2. tests/gpu/agreement.py: taylor and obs on SmolLM2, CPU against CUDA at the same seed (channels, logits);
#   3. the `gpu` pytest marker's tests (tests/gpu/test_cuda.py).
# Results: JSON lines in $OUT/gpu.jsonl (else tests/gpu/results/gpu.jsonl), a summary table on stdout.
#
#   bash tests/gpu/run.sh                          on a machine with CUDA, after `make setup`
#   PRUNELAB_GPU_DRYRUN=1 bash tests/gpu/run.sh    anywhere: every step composed, validated and planned
#                                                  (dry_run=true), agreement.py's pruners built; nothing loaded
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DRY=${PRUNELAB_GPU_DRYRUN:-0}
RESULTS_DIR=${OUT:-tests/gpu/results}
RESULTS=$RESULTS_DIR/gpu.jsonl
mkdir -p "$RESULTS_DIR"
export PRUNELAB_GPU_WORK=${PRUNELAB_GPU_WORK:-$(mktemp -d -t prunelab-gpu-XXXX)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
[ -x "$PY" ] || { echo "run.sh: $PY not found: run \`make setup\` first (or PYTHON=...)" >&2; exit 2; }
status=0
start=$(date +%s)

if [ "$DRY" = 1 ]; then
  echo "== dry run: plans only (PRUNELAB_GPU_DRYRUN=1)"
  timeout 300 "$PY" tests/gpu/measure.py tests/gpu/steps.txt "$RESULTS" --dry-run || status=1
  timeout 120 "$PY" tests/gpu/agreement.py --dry-run || status=1
  echo "== dry run done in $(( $(date +%s) - start )) s, status $status"
  exit $status
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
  || { echo "run.sh: torch sees no CUDA device (PRUNELAB_GPU_DRYRUN=1 checks the script without one)" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. measured runs ($(grep -cv '^\s*\(#\|$\|dry:\)' tests/gpu/steps.txt) steps)"
timeout 330 "$PY" tests/gpu/measure.py tests/gpu/steps.txt "$RESULTS" || status=1
echo "== 2. CPU/GPU agreement ($(( $(date +%s) - start )) s so far)"
timeout 80 "$PY" tests/gpu/agreement.py --out "$RESULTS" || status=1
echo "== 3. pytest -m gpu ($(( $(date +%s) - start )) s so far)"
timeout 50 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -x 2>&1 | tail -15 || status=1

echo "== summary ($(( $(date +%s) - start )) s in all)"
"$PY" - "$RESULTS" <<'PY'
import json, sys
g = 2**30
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "wall_s" in r:
        dev, pred = r.get("peak_device_bytes"), r.get("predicted_device_tensor_bytes")
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['label']:<20} {r['wall_s']:7.1f} s  device {((dev or 0) / g):6.2f} GiB"
              f"  planned {((pred or 0) / g):6.2f} GiB  ratio {r.get('device_measured_over_predicted')}"
              f"  {r['status']} {r.get('error') or ''}")
    else:
        print(f"{'ok ' if r.get('ok') else 'BAD'} {r['label']:<20} channels identical {r.get('kept_sets_identical')}"
              f"  logits rel diff {r.get('logits_max_rel_diff')}")
PY
exit $status
