#!/usr/bin/env bash
# The original LLM-Pruner (github.com/horseee/LLM-Pruner) in its own environment, for the whole-process comparison
# of tests/bench/process_bench.py (tests/peers/llm_pruner_original.py runs its llama3.py there).
#
#     bash tests/peers/llm_pruner_env.sh SOURCE [VENV]
#
# SOURCE: a git directory of horseee/LLM-Pruner (a clone or a bare mirror); its HEAD's LLMPruner/ and llama3.py are
# exported with `git archive` into VENV/src (default VENV .venv-peers/llm_pruner, outside git).
# Requirements: the original's requirement.txt asks transformers>=4.28.1 and its README pins 4.28; 4.28's Llama has
# no grouped KV heads (num_key_value_heads, 4.31+) and no rope_theta (4.33+), so it cannot run SmolLM2 (3 KV heads,
# rope_theta 100000). transformers==4.41.0 is used instead (as for the Wanda and SliceGPT peers), with the packages
# llama3.py imports: datasets==2.18.0 (imported by LLMPruner.datasets at import time; never called here),
# accelerate (its from_pretrained(device_map="auto")), sentencepiece, numpy, tqdm. torch: the same version as the
# project's .venv, CPU build (the CPU wheel index when it answers, else the same version from PyPI, else plain
# PyPI), so both sides run the same kernels.
# Prints the venv's python path last. Does nothing when VENV already holds the same commit (VENV/peer_commit).
set -euo pipefail
source "$(dirname "$0")/_env.sh"  # peer_env: SRC ROOT VENV GIT COMMIT PIP, a venv with torch; peer_done
peer_env llm_pruner "$@"
"${PIP[@]}" "transformers==4.41.0" "datasets==2.18.0" accelerate sentencepiece numpy tqdm
mkdir -p "$VENV/src"
"${GIT[@]}" archive --format=tar HEAD LLMPruner llama3.py | tar -x -C "$VENV/src"
"$VENV/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1])
import LLMPruner.torch_pruning, LLMPruner.pruner.hf_llama_pruner, LLMPruner.datasets.example_samples, transformers
assert transformers.__version__ == "4.41.0"' "$VENV/src"
peer_done
