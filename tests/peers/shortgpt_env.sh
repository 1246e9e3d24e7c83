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
source "$(dirname "$0")/_env.sh"  # peer_env: SRC ROOT VENV GIT COMMIT PIP, a venv with torch; peer_done
peer_env shortgpt "$@"
"${PIP[@]}" "transformers==4.41.0" accelerate numpy tqdm
mkdir -p "$VENV/src"
"${GIT[@]}" archive --format=tar HEAD shortgpt | tar -x -C "$VENV/src"
"$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/shortgpt"); import metrics, shortgpt, transformers
assert transformers.__version__ == "4.41.0"' "$VENV/src"
peer_done
