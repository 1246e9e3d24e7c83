#!/usr/bin/env bash
# The original FLAP (github.com/CASIA-IVA-Lab/FLAP) in its own environment, for the side-by-side check of
# pruner=flap (tests/peers/flap_original.py, run by tests/bench/peers_bench.py --method flap).
#
#     bash tests/peers/flap_env.sh SOURCE [VENV]
#
# SOURCE: a git directory of CASIA-IVA-Lab/FLAP (a clone or a bare mirror); its HEAD is exported with `git archive`
# into VENV/src (default VENV .venv-peers/flap, outside git); flap_original.py imports lib/ from there.
# Requirements: the original's INSTALL.md pins transformers==4.28.0, datasets==2.11.0, accelerate==0.18.0, which
# cannot run SmolLM2: 4.28's Llama has no grouped KV heads (num_key_value_heads, 4.31+) and no rope_theta (4.33+),
# so SmolLM2 (3 KV heads, rope_theta 100000) would load with wrong shapes or wrong positions. A later release that
# runs it and installs on this Python is used instead: transformers==4.41.0 (the same as the SliceGPT peer),
# datasets==2.18.0 (lib/data.py imports it at import time; it is never called), sentencepiece, accelerate.
# torch: the CPU wheel index when it answers, else the same CPU build as the project's .venv, else plain PyPI.
# Prints the venv's python path last. Does nothing when VENV already holds the same commit (VENV/peer_commit).
set -euo pipefail
source "$(dirname "$0")/_env.sh"  # peer_env: SRC ROOT VENV GIT COMMIT PIP, a venv with torch; peer_done
peer_env flap "$@"
"${PIP[@]}" "transformers==4.41.0" "datasets==2.18.0" accelerate sentencepiece numpy tqdm
mkdir -p "$VENV/src"
"${GIT[@]}" archive --format=tar HEAD lib models main.py | tar -x -C "$VENV/src"
"$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import lib.prune, transformers
assert transformers.__version__ == "4.41.0"' "$VENV/src"
peer_done
