#!/usr/bin/env bash
# The README's second command: install what is needed, then run the whole suite (as root):
# unit tests, then the privileged tests in throw-away network namespaces. Extra arguments go to pytest.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
cd "$top"
exec .venv/bin/python -m pytest -ra -p no:cacheprovider "$@" tests
