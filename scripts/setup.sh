#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on a Debian 12 machine, as root.
# Idempotent: a second run only checks. The venv lives in .venv at the top of the checkout.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and makes network namespaces)" >&2
  exit 2
fi

pkgs=(nftables libnftables1 dnsmasq-base iproute2 dnsutils knot-dnsutils curl conntrack procps iputils-ping
      python3 python3-venv python3-dev gcc)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.egressd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi
