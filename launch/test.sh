#!/usr/bin/env bash
# Set up (virtualenv + install with the test extra) and run the whole test suite.
#   bash launch/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
emjax_install "[test]"
python -m pytest -q "$@"
