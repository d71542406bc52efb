#!/usr/bin/env bash
# Removes what scripts/install.sh installed, as root.
#
#   scripts/uninstall.sh [--remove-rules] [--purge]
#
# By default it stops and disables the units (when systemd runs), and removes /opt/egressd, the
# commands in /usr/local/bin, the units, and the sysusers.d and tmpfiles.d entries. It keeps:
#   - the nftables table "inet egressd": restricted workloads stay restricted (fail closed), with
#     no DNS. --remove-rules deletes the table, which OPENS THE NODE: every workload then reaches
#     everything. Later, without egressd installed: nft delete table inet egressd
#   - /etc/egressd, /var/lib/egressd, the collector's database and the group egressd.
#     --purge deletes them too.
set -euo pipefail

PREFIX=/opt/egressd
BIN=/usr/local/bin
UNITDIR=/usr/lib/systemd/system
SYSUSERS=/usr/lib/sysusers.d/egressd.conf
TMPFILES=/usr/lib/tmpfiles.d/egressd.conf
COMMANDS=(egressd egressctl egress-collector)
UNITS=(egressd.service egress-collector.service)

say() { echo "uninstall.sh: $*"; }
die() { echo "uninstall.sh: error: $*" >&2; exit 2; }

remove_rules=0
purge=0
for arg in "$@"; do
  case "$arg" in
    --remove-rules) remove_rules=1 ;;
    --purge) purge=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $arg (usage: uninstall.sh [--remove-rules] [--purge])" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root"

# 1. Stop the services. Stopping egressd leaves its rules in the kernel.
if [ -d /run/systemd/system ]; then
  for u in "${UNITS[@]}"; do
    if systemctl cat "$u" >/dev/null 2>&1; then
      systemctl disable --now --quiet "$u" || say "warning: could not stop $u"
    fi
  done
elif pgrep -f "^$PREFIX/bin/python3? $PREFIX/bin/(egressd run|egress-collector)" >/dev/null 2>&1; then
  say "warning: egressd or egress-collector still runs from $PREFIX (started by hand): stop it"
fi

# 2. The rules, only when asked.
if [ "$remove_rules" = 1 ]; then
  if nft list table inet egressd >/dev/null 2>&1; then
    say "removing the nftables table inet egressd: the node is now OPEN, workloads are unrestricted"
    if [ -x "$PREFIX/bin/egressd" ]; then
      "$PREFIX/bin/egressd" uninstall-rules --yes
    else
      nft delete table inet egressd
    fi
  else
    say "no nftables table inet egressd to remove"
  fi
elif nft list table inet egressd >/dev/null 2>&1; then
  say "kept the nftables table inet egressd (fail closed: restricted workloads stay restricted, without DNS)"
  say "  to open the node later: nft delete table inet egressd"
fi

# 3. Files.
for c in "${COMMANDS[@]}"; do
  if [ -L "$BIN/$c" ] && [[ "$(readlink "$BIN/$c")" == "$PREFIX/"* ]]; then
    rm -f "$BIN/$c"
  fi
done
for u in "${UNITS[@]}"; do
  rm -f "$UNITDIR/$u"
done
rm -f "$SYSUSERS" "$TMPFILES"
rm -rf "$PREFIX" /run/egressd
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl reset-failed "${UNITS[@]}" >/dev/null 2>&1 || true
fi

# 4. Configuration, state and the group, only with --purge.
if [ "$purge" = 1 ]; then
  rm -rf /etc/egressd /var/lib/egressd /var/lib/egress-collector /var/lib/private/egress-collector
  rmdir /var/lib/private 2>/dev/null || true  # systemd's DynamicUser= parent, if nothing else uses it
  if getent group egressd >/dev/null; then
    groupdel egressd
  fi
  say "purged /etc/egressd, /var/lib/egressd, /var/lib/egress-collector and the group egressd"
else
  say "kept /etc/egressd, /var/lib/egressd, /var/lib/egress-collector and the group egressd (--purge removes them)"
fi
say "done"
