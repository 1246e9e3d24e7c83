#!/usr/bin/env bash
# The original ShortGPT (github.com/icip-cas/ShortGPT, the authors' code) in its own environment, for the side-by-side check of
# pruner=shortgpt (tests/peers/shortgpt_original.py, run by tests/bench/peers_bench.py --method shortgpt).
#
#     bash tests/peers/shortgpt_env.sh SOURCE [VENV]
#
# SOURCE: a git directory of icip-cas/ShortGPT (a clone or a bare mirror); its HEAD is exported with `git archive`
# into VENV/src (default VENV .venv-peers/shortgpt, outside git); shortgpt_original.py imports shortgpt/ from there.
# Requirements: the repository pins nothing (no requirements file; its README points at the Llama 2 setup).
# shortgpt/shortgpt.py imports numpy, torch and transformers; shortgpt/run_shortgpt.py (not run: it downloads
# pg19 and Llama-2-7b) also datasets and tqdm. transformers==4.41.0 (the SliceGPT peer's), numpy, tqdm,
# accelerate (its from_pretrained uses device_map="auto").
# torch: the CPU wheel index when it answers, else the same CPU build as the project's .venv, else plain PyPI.
# Prints the venv's python path last. Does nothing when VENV already holds the same commit (VENV/peer_commit).
set -euo pipefail
SRC=${1:?usage: shortgpt_env.sh SOURCE_GIT_DIR [VENV]}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${2:-$ROOT/.venv-peers/shortgpt}
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
"${PIP[@]}" "transformers==4.41.0" accelerate numpy tqdm
mkdir -p "$VENV/src"
"${GIT[@]}" archive --format=tar HEAD shortgpt | tar -x -C "$VENV/src"
"$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/shortgpt"); import metrics, shortgpt, transformers
assert transformers.__version__ == "4.41.0"' "$VENV/src"
echo "$COMMIT" > "$VENV/peer_commit"
echo "$VENV/bin/python"
