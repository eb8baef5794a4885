#!/usr/bin/env bash
# FramePack Local launcher.
#   ./run.sh [app options]   set up .venv on first use, then start the app on http://127.0.0.1:7860
#   ./run.sh test [pytest options]   set up (with test tools) and run the test suite
#   ./run.sh cli ARGS...     the command line: generate, download, make-tiny-model
# Later starts install nothing unless requirements*.txt or the torch choice changed.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=${FPL_TORCH_VERSION:-2.13.0}

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "FramePack Local needs Python 3.10 or newer; install it and run ./run.sh again." >&2
  exit 2
fi

want_tests=0
[ "${1:-}" = "test" ] && want_tests=1

# An NVIDIA GPU gets the newest CUDA build of torch its driver runs; everything else the CPU build
# (framepack_local/memory/gpu_check.py, stdlib only). FPL_TORCH_INDEX overrides the choice.
if [ -n "${FPL_TORCH_INDEX+x}" ]; then
  torch_index=$FPL_TORCH_INDEX
else
  torch_index=$("$PY" framepack_local/memory/gpu_check.py --torch-index)
fi

[ -x "$VENV/bin/python" ] || { echo "Creating $VENV ..."; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"

# One stamp per set of requirements: nothing is installed again unless its file (or the torch choice) changed.
stamp_of() { printf '%s' "$*" | cksum | cut -d' ' -f1; }  # POSIX everywhere (macOS has no sha256sum)
base_stamp=$(stamp_of "torch=$TORCH_VERSION index=$torch_index" "$(cat requirements.txt)" \
  "$([ -n "$torch_index" ] && cat requirements-cuda.txt)")
if [ "$(cat "$VENV/.fpl-stamp" 2>/dev/null)" != "$base_stamp" ]; then
  echo "Installing packages into $VENV (first run or requirements changed) ..."
  if [ -n "$torch_index" ]; then
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$torch_index"
    "$VPY" -m pip install -q -r requirements-cuda.txt
  else
    "$VPY" -m pip install -q "torch==$TORCH_VERSION"
  fi
  "$VPY" -m pip install -q -r requirements.txt
  echo "$base_stamp" > "$VENV/.fpl-stamp"
fi
if [ $want_tests = 1 ]; then
  test_stamp=$(stamp_of "$(cat requirements-test.txt)")
  if [ "$(cat "$VENV/.fpl-stamp-test" 2>/dev/null)" != "$test_stamp" ]; then
    "$VPY" -m pip install -q -r requirements-test.txt
    echo "$test_stamp" > "$VENV/.fpl-stamp-test"
  fi
fi

export GRADIO_ANALYTICS_ENABLED=False
case "${1:-}" in
  test) shift; exec "$VPY" -m pytest -q "$@" ;;
  cli) shift; exec "$VPY" -m framepack_local "$@" ;;
  *) exec "$VPY" app.py "$@" ;;
esac
