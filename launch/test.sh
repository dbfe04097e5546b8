#!/usr/bin/env bash
# Set up (virtualenv + install with the test extra) and run the whole test suite.
#   bash launch/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
emjax_install "[test]"
# Two workers, a test file each at a time (its module-scoped compiled fixtures are built once):
# most tests are bound by XLA compiles, which take one core each. EMJAX_TEST_WORKERS=0: one process.
# The 25 slowest tests are listed at the end: the suite's time budget is watched from there.
workers="${EMJAX_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  python -m pytest -q --durations=25 "$@"
else
  python -m pytest -q -n "$workers" --dist loadfile --durations=25 "$@"
fi
