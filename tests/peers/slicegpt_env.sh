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
# SliceGPT commit (VENV/peer_commit).
set -euo pipefail
source "$(dirname "$0")/_env.sh"  # peer_env: SRC ROOT VENV GIT COMMIT PIP, a venv with torch; peer_done
peer_env slicegpt "$@"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"${GIT[@]}" archive --format=tar HEAD | tar -x -C "$TMP"
# the pins of pyproject.toml's [project].dependencies (experiment extras such as wandb/lm-eval are not needed)
"${PIP[@]}" "transformers==4.41.0" "datasets==2.18.0" accelerate ml-collections numpy tqdm
"${PIP[@]}" --no-deps "$TMP"
"$VENV/bin/python" -c 'import slicegpt, transformers; assert transformers.__version__ == "4.41.0"'
peer_done
