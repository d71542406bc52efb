#!/usr/bin/env bash
# Installs egressd from this checkout on a Debian 12 node, as root. The README, CI
# (tests/priv/test_packaging.py) and vagrant/ all use this script. Idempotent: run it again to
# upgrade from a newer checkout. It never overwrites /etc/egressd/egressd.toml.
#
#   scripts/install.sh [--start]
#
# What it does:
#   - apt-get installs the runtime packages that are missing (nftables, libnftables1, python3,
#     python3-venv, iproute2, ca-certificates, systemd for systemd-sysusers/-tmpfiles);
#   - creates the venv /opt/egressd and pip-installs this checkout into it (not editable), then
#     links egressd, egressctl and egress-collector into /usr/local/bin;
#   - installs the units (/usr/lib/systemd/system), sysusers.d and tmpfiles.d entries, and runs
#     systemd-sysusers and systemd-tmpfiles for them: group egressd, /run/egressd, /var/lib/egressd;
#   - writes a commented /etc/egressd/egressd.toml (0640 root:egressd) if there is none, and
#     creates /etc/egressd/policies.d;
#   - when systemd is the running init: daemon-reload, and enable egressd and egress-collector.
#
# It starts nothing unless --start is given; then it (re)starts both units. A restart is safe: the
# new daemon takes over the rules in the kernel with no open window.
set -euo pipefail

PREFIX=/opt/egressd
BIN=/usr/local/bin
UNITDIR=/usr/lib/systemd/system
SYSUSERS=/usr/lib/sysusers.d/egressd.conf
TMPFILES=/usr/lib/tmpfiles.d/egressd.conf
ETC=/etc/egressd
COMMANDS=(egressd egressctl egress-collector)
UNITS=(egressd.service egress-collector.service)
PKGS=(nftables libnftables1 python3 python3-venv iproute2 ca-certificates)

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 2; }

start=0
for arg in "$@"; do
  case "$arg" in
    --start) start=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $arg (usage: install.sh [--start])" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root"
top=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$top/pyproject.toml" ] || [ ! -d "$top/daemon/egressd" ]; then die "$top is not an egressd checkout"; fi
systemd_running=0
[ -d /run/systemd/system ] && systemd_running=1
if [ "$start" = 1 ] && [ "$systemd_running" = 0 ]; then
  die "--start needs systemd as the running init; here, run the daemon by hand: egressd run"
fi
t0=$(date +%s)

# 1. Debian packages (only the missing ones, so a second run needs no network).
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v systemd-sysusers >/dev/null && command -v systemd-tmpfiles >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The venv and the package. The source is copied out first: the build never writes into the
#    checkout (which may be read-only, or a developer's tree with an editable install).
if [ ! -x "$PREFIX/bin/python" ] || ! "$PREFIX/bin/python" -c 'import sys' 2>/dev/null; then
  say "creating the venv $PREFIX"
  rm -rf "$PREFIX"
  /usr/bin/python3 -m venv "$PREFIX"
fi
srcfiles() {
  (cd "$top" && find pyproject.toml README.md daemon nft -type f \
     ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z)
}
hash=$( (cd "$top" && srcfiles | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1)
stamp="$PREFIX/.egressd-source"
if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ] || [ ! -x "$PREFIX/bin/egressd" ]; then
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  (cd "$top" && srcfiles | tar --null -T - -cf -) | tar -C "$build" -xf -
  say "pip install $top into $PREFIX"
  # pip always rebuilds and reinstalls a local directory, even with an unchanged version number;
  # --upgrade also moves the dependencies to what pyproject.toml asks for now.
  "$PREFIX/bin/pip" install -q --disable-pip-version-check --upgrade "$build"
  echo "$hash" >"$stamp"
else
  say "package up to date in $PREFIX"
fi
install -d -m 0755 "$PREFIX/share/doc/egressd"
install -m 0644 "$top/README.md" "$PREFIX/share/doc/egressd/README.md"
"$PREFIX/bin/python" -c 'from egressd.core.config import EXAMPLE_CONFIG; print(EXAMPLE_CONFIG, end="")' \
  >"$PREFIX/share/doc/egressd/egressd.toml.example"
for c in "${COMMANDS[@]}"; do
  ln -sfn "$PREFIX/bin/$c" "$BIN/$c"
done

# 3. Units, the group and the directories.
install -d -m 0755 "$UNITDIR" "$(dirname "$SYSUSERS")" "$(dirname "$TMPFILES")"
for u in "${UNITS[@]}"; do
  install -m 0644 "$top/systemd/$u" "$UNITDIR/$u"
done
install -m 0644 "$top/systemd/egressd.sysusers" "$SYSUSERS"
install -m 0644 "$top/systemd/egressd.tmpfiles" "$TMPFILES"
systemd-sysusers "$SYSUSERS"
systemd-tmpfiles --create "$TMPFILES"

# 4. Configuration: a commented default the first time, never over an operator's file.
install -d -m 0755 "$ETC" "$ETC/policies.d"
if [ ! -e "$ETC/egressd.toml" ]; then
  install -m 0640 -o root -g egressd "$PREFIX/share/doc/egressd/egressd.toml.example" "$ETC/egressd.toml"
  say "wrote $ETC/egressd.toml: set dns.upstreams before starting egressd"
else
  say "kept $ETC/egressd.toml (the current example: $PREFIX/share/doc/egressd/egressd.toml.example)"
fi
if ! "$PREFIX/bin/egressd" check-config "$ETC/egressd.toml" >/dev/null; then
  say "warning: $ETC/egressd.toml does not validate (see above); egressd will refuse to start"
elif grep -Eq '^[[:space:]]*upstreams[[:space:]]*=.*203\.0\.113\.2' "$ETC/egressd.toml"; then
  say "note: dns.upstreams is still the documentation address 203.0.113.2: replace it with your resolvers"
fi

# 5. systemd, when it is the running init.
if [ "$systemd_running" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --quiet "${UNITS[@]}"
  if [ "$start" = 1 ]; then
    systemctl restart egress-collector.service egressd.service
    say "started: $(systemctl is-active egressd.service) egressd, $(systemctl is-active egress-collector.service) egress-collector"
  elif systemctl is-active --quiet egressd.service; then
    say "egressd is running the previous code: 'systemctl restart egressd' when you are ready"
  else
    say "enabled; start with: systemctl start egress-collector egressd"
  fi
else
  say "systemd is not the running init: units installed, not enabled; run 'egressd run' by hand"
fi
say "done in $(( $(date +%s) - t0 ))s"
