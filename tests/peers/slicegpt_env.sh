#!/usr/bin/env bash
# The original SliceGPT (github.com/microsoft/TransformerCompression) in its own environment, for the side-by-side
# check of pruner=slicegpt (tests/peers/slicegpt_original.py, tests/bench/slicegpt_peer_bench.py).
#
#     bash tests/peers/slicegpt_env.sh SOURCE [VENV]
#
# SOURCE: a git directory of TransformerCompression (a clone or a bare mirror); its HEAD is exported with
# `git archive` into a temporary folder and installed (not editable) into VENV (default .venv-peers/slicegpt,
# outside git). Requirements are the original's own pins from its pyproject.toml: transformers==4.41.0,
# datasets==2.18.0, plus its unpinned accelerate, ml-collections, numpy, torch, tqdm. torch comes from the CPU
# wheel index when it answers; otherwise the same CPU build as the project's .venv (on this workplace a local
# wheel), else plain PyPI. Prints the venv's python path last. Does nothing when VENV already holds the same
# SliceGPT commit (VENV/slicegpt_commit).
set -euo pipefail
SRC=${1:?usage: slicegpt_env.sh SOURCE_GIT_DIR [VENV]}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${2:-$ROOT/.venv-peers/slicegpt}
PY=${PEER_PYTHON:-python3}
if [ -d "$SRC/.git" ]; then GIT=(git -C "$SRC"); else GIT=(git --git-dir="$SRC"); fi
COMMIT=$("${GIT[@]}" rev-parse HEAD)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/slicegpt_commit" 2>/dev/null)" = "$COMMIT" ]; then
  echo "$VENV/bin/python"; exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch: SliceGPT does not pin it. The CPU index first (no CUDA libraries), then the project's own CPU build.
if ! "${PIP[@]}" --retries 0 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
  OURS=$("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  if [ -n "$OURS" ] && "${PIP[@]}" "torch==$OURS" 2>/dev/null; then :; else "${PIP[@]}" torch; fi
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"${GIT[@]}" archive --format=tar HEAD | tar -x -C "$TMP"
# the pins of pyproject.toml's [project].dependencies (experiment extras such as wandb/lm-eval are not needed)
"${PIP[@]}" "transformers==4.41.0" "datasets==2.18.0" accelerate ml-collections numpy tqdm
"${PIP[@]}" --no-deps "$TMP"
"$VENV/bin/python" -c 'import slicegpt, transformers; assert transformers.__version__ == "4.41.0"'
echo "$COMMIT" > "$VENV/slicegpt_commit"
echo "$VENV/bin/python"
