# Sourced by the launch scripts: picks the interpreter of the project's environment.
#   PYTHON set       -> that interpreter
#   .venv present    -> <repo>/.venv/bin/python (what `make install` creates)
#   otherwise        -> python3, with a warning on stderr
# Also points TORCH_EXTENSIONS_DIR at the environment's own folder unless it is set.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHON="$ROOT/.venv/bin/python"
  else
    echo "warning: $ROOT/.venv not found (run 'make install'); using python3 from PATH" >&2
    PYTHON=python3
  fi
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PYTHON" -c 'import sys; print(sys.prefix)')/torch_extensions}
