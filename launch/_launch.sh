# Sourced by the launch/tpu and launch/gpu scripts: errors, flags, dry runs.
#
# DRY_RUN=1 (or --dry-run): every command that would touch a cloud project, a cluster or a machine
# is printed to stdout instead, one line each, quoted for bash; what the script says about its
# progress goes to stderr either way.
set -euo pipefail

LAUNCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
EMJAX_ARGS=()
# A dry run prints to the script's stdout even from inside $(...), whose output a query returns.
exec 3>&1

say() { echo "[emjax] $*" >&2; }

die() {  # a mistake in the command line or the environment: its message, exit status 2
  echo "emjax launch: error: $*" >&2
  exit 2
}

usage_error() {  # the script's USAGE, then the error
  echo "$USAGE" >&2
  echo >&2
  die "$@"
}

is_dry_run() { [ "$DRY_RUN" = "1" ]; }

check_dry_run_value() {
  case "$DRY_RUN" in
    0|1) ;;
    *) die "DRY_RUN=$DRY_RUN: expected 1 (print the commands) or 0 (run them)" ;;
  esac
}

quote() {  # the words as one bash command line, quoted only where needed
  local out=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$w"); else out+=("${w@Q}"); fi
  done
  echo "${out[*]}"
}

run() {  # a command that changes something: printed in a dry run, else run
  if is_dry_run; then quote "$@" >&3; else "$@"; fi
}

query() {  # a command whose output is read: printed in a dry run (its output is then empty), else run
  if is_dry_run; then quote "$@" >&3; else "$@"; fi
}

require_tool() {  # $1: a command the script runs, $2: where it comes from (a dry run needs neither)
  is_dry_run || command -v "$1" >/dev/null || die "$1 not found: $2"
}

flag_value() {  # --key=value -> value; a bare --key (no "=") is refused by name
  case "$1" in
    *=*) echo "${1#*=}" ;;
    *) die "$1 needs a value: ${1}=VALUE" ;;
  esac
}

positive_int() {  # $1: flag name, $2: value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1=$2: expected a positive integer"
}

normalize_workdir() {  # gs://b//run/ -> gs://b/run, ./runs//tiny/ -> runs/tiny: one spelling per directory
  local w="$1" scheme=""
  case "$w" in gs://*) scheme="gs://"; w="${w#gs://}" ;; esac
  while [[ "$w" == *//* ]]; do w="${w//\/\//\/}"; done
  while [[ "$w" == ./* ]]; do w="${w#./}"; done
  if [ "$w" != / ]; then w="${w%/}"; fi
  echo "$scheme$w"
}

emjax_workdir() {  # the --workdir among EMJAX_ARGS (absl takes the last one), normalised, or nothing
  local w="" a
  for a in "${EMJAX_ARGS[@]+"${EMJAX_ARGS[@]}"}"; do
    case "$a" in --workdir=*|-workdir=*) w="${a#*=}" ;; esac
  done
  if [ -n "$w" ]; then normalize_workdir "$w"; fi
}

require_emjax_args() {  # the flags of emjax.main after "--": a --config and a --workdir
  [ "${#EMJAX_ARGS[@]}" -gt 0 ] || usage_error "no emjax flags: add -- --config=FILE --workdir=DIR [--config.x=y ...]"
  local a has_config=0
  for a in "${EMJAX_ARGS[@]}"; do
    case "$a" in --config=*|-config=*) has_config=1 ;; esac
  done
  [ "$has_config" = 1 ] || usage_error "the emjax flags have no --config=FILE"
  [ -n "$(emjax_workdir)" ] || usage_error "the emjax flags have no --workdir=DIR"
}

emjax_python() {  # the interpreter that has emjax: $PYTHON, the active virtualenv's, ./.venv's
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ]; then echo "$VIRTUAL_ENV/bin/python"
  elif [ -x "$LAUNCH_ROOT/.venv/bin/python" ]; then echo "$LAUNCH_ROOT/.venv/bin/python"
  elif is_dry_run; then echo python3
  else die "no Python with emjax: activate its virtualenv, set PYTHON=..., or drop --no-install"
  fi
}
