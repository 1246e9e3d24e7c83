# Sourced by tests/peers/<method>_env.sh: the part of building a peer's own environment that is the same for every
# peer. `peer_env NAME SOURCE_GIT_DIR [VENV]` sets SRC, ROOT, VENV (default .venv-peers/NAME, outside git), GIT (the
# git command for SOURCE: a clone or a bare mirror), COMMIT (its HEAD) and PIP; when VENV already holds that commit it
# prints VENV's python and exits; otherwise it makes a fresh venv with torch: the project's own version, the CPU
# build (the CPU wheel index when it answers, else the package index), else any torch. The caller then installs the
# peer's pins, exports its source, checks the imports and calls `peer_done`, which marks VENV and prints its python.
peer_env() {
  local name=$1
  SRC=${2:?usage: ${name}_env.sh SOURCE_GIT_DIR [VENV]}
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  VENV=${3:-$ROOT/.venv-peers/$name}
  if [ -d "$SRC/.git" ]; then GIT=(git -C "$SRC"); else GIT=(git --git-dir="$SRC"); fi
  COMMIT=$("${GIT[@]}" rev-parse HEAD)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/peer_commit" 2>/dev/null)" = "$COMMIT" ]; then
    echo "$VENV/bin/python"; exit 0
  fi
  rm -rf "$VENV"
  "${PEER_PYTHON:-python3}" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --quiet)
  local ours
  ours=$("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  if "${PIP[@]}" --retries 0 --timeout 20 "torch${ours:+==${ours%%+*}}" \
       --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then :
  elif [ -n "$ours" ] && "${PIP[@]}" "torch==$ours" 2>/dev/null; then :
  elif [ -n "$ours" ] && "${PIP[@]}" "torch==${ours%%+*}" 2>/dev/null; then :
  else "${PIP[@]}" torch; fi
}

peer_done() {
  echo "$COMMIT" > "$VENV/peer_commit"
  echo "$VENV/bin/python"
}
