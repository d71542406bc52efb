#!/usr/bin/env bash
# The benchmark suite (issue 7): installs what it needs, then runs every benchmark in throw-away
# network namespaces and writes bench/results/latest.json and latest.md. As root.
#   sudo bench/run.sh            # full run, about 12 minutes on 2 cores
#   sudo bench/run.sh --quick    # short runs, about 4 minutes
#   sudo bench/run.sh --only a,d --profile
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "bench/run.sh: run as root (network namespaces, nftables)" >&2
  exit 2
fi
"$top/scripts/setup.sh"
missing=()
for p in dnsperf iperf3; do
  command -v "$p" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/run.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [[ " $* " == *" --profile "* || " $* " == *"profile"* ]] && [ ! -x "$top/.venv/bin/py-spy" ]; then
  "$top/.venv/bin/pip" install -q py-spy
fi
# The daemon under test runs from a venv that holds egressd's runtime dependencies only, as
# scripts/install.sh installs it: the test extras in .venv (rich and pygments, via schemathesis,
# which structlog imports when present) would add ~4 MB to the RSS that benchmark f measures.
dv="$top/bench/.venv-daemon"
[ -x "$dv/bin/python" ] || "$top/.venv/bin/python" -m venv "$dv"
"$dv/bin/pip" install -q --disable-pip-version-check --upgrade "$top"
export EGRESSD_BENCH_PYTHON="$dv/bin/python"
cd "$top"
exec .venv/bin/python bench/run.py "$@"
