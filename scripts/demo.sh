#!/usr/bin/env bash
# The README's first command: install what is needed, then run `egressd demo` (as root).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
exec "$top/.venv/bin/egressd" demo "$@"
