#!/usr/bin/env bash
# The original Wanda (github.com/locuslab/wanda) in its own environment, for the side-by-side check of
# pruner=wanda (tests/peers/wanda_original.py, run by tests/bench/peers_bench.py --method wanda).
#
#     bash tests/peers/wanda_env.sh SOURCE [VENV]
#
# SOURCE: a git directory of locuslab/wanda (a clone or a bare mirror); its HEAD is exported with `git archive`
# into VENV/src (default VENV .venv-peers/wanda, outside git); wanda_original.py imports lib/ from there.
# Requirements: the original's INSTALL.md pins transformers==4.28.0, datasets==2.11.0, accelerate==0.18.0, which
# cannot run SmolLM2: 4.28's Llama has no grouped KV heads (num_key_value_heads, 4.31+) and no rope_theta (4.33+),
# so SmolLM2 (3 KV heads, rope_theta 100000) would load with wrong shapes or wrong positions. A later release that
# runs it and installs on this Python is used instead: transformers==4.41.0 (the same as the SliceGPT peer),
# datasets==2.18.0 (lib/data.py imports it at import time; it is never called), sentencepiece, accelerate.
# torch: the CPU wheel index when it answers, else the same CPU build as the project's .venv, else plain PyPI.
# Prints the venv's python path last. Does nothing when VENV already holds the same commit (VENV/peer_commit).
set -euo pipefail
SRC=${1:?usage: wanda_env.sh SOURCE_GIT_DIR [VENV]}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${2:-$ROOT/.venv-peers/wanda}
PY=${PEER_PYTHON:-python3}
if [ -d "$SRC/.git" ]; then GIT=(git -C "$SRC"); else GIT=(git --git-dir="$SRC"); fi
COMMIT=$("${GIT[@]}" rev-parse HEAD)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/peer_commit" 2>/dev/null)" = "$COMMIT" ]; then
  echo "$VENV/bin/python"; exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
if ! "${PIP[@]}" --retries 0 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
  OURS=$("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  if [ -n "$OURS" ] && "${PIP[@]}" "torch==$OURS" 2>/dev/null; then :; else "${PIP[@]}" torch; fi
fi
"${PIP[@]}" "transformers==4.41.0" "datasets==2.18.0" accelerate sentencepiece numpy
mkdir -p "$VENV/src"
"${GIT[@]}" archive --format=tar HEAD lib main.py | tar -x -C "$VENV/src"
"$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import lib.prune, transformers
assert transformers.__version__ == "4.41.0"' "$VENV/src"
echo "$COMMIT" > "$VENV/peer_commit"
echo "$VENV/bin/python"
