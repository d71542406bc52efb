#!/usr/bin/env bash
# Checks the installed units under a real systemd (the Vagrant box; CI has no systemd as init).
# Run as root after scripts/install.sh. It starts both units with their full sandbox and checks:
# READY=1 and the status text, the API socket's group gate, ExecReload, a crash restart,
# a bad config refused by ExecStartPre with the rules kept, and stop leaving the rules (fail closed).
# At the end both units are stopped and egressd's table is removed, so that the test suite starts
# from the same state as in CI.
#
# If dns.upstreams still holds the documentation address, it is replaced with this machine's
# first resolver from /etc/resolv.conf (this is a development box).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
CONFIG=/etc/egressd/egressd.toml

fail() { echo "systemd-smoke: FAIL: $*" >&2; systemctl status --no-pager egressd egress-collector >&2 || true; exit 1; }
ok() { echo "systemd-smoke: ok: $*"; }
wait_active() {  # unit, seconds
  for _ in $(seq "$(($2 * 5))"); do
    systemctl is-active --quiet "$1" && return 0
    sleep 0.2
  done
  return 1
}

[ "$(id -u)" = 0 ] || fail "run as root"
[ -d /run/systemd/system ] || fail "systemd is not the running init here"

if grep -q '203\.0\.113\.2' "$CONFIG"; then
  ns=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
  case "$ns" in *:*) ns="[$ns]:53" ;; "") ns="127.0.0.1:53" ;; *) ns="$ns:53" ;; esac
  sed -i "s/\"203\.0\.113\.2:53\"/\"$ns\"/" "$CONFIG"
  ok "dns.upstreams set to $ns"
fi

"$top/scripts/install.sh" --start
wait_active egressd.service 30 || fail "egressd.service is not active"
wait_active egress-collector.service 30 || fail "egress-collector.service is not active"
systemctl is-enabled --quiet egressd.service || fail "egressd.service is not enabled"
[[ "$(systemctl show -p StatusText --value egressd)" == generation* ]] || fail "no STATUS= from the daemon"
ok "both units active and enabled; egressd says: $(systemctl show -p StatusText --value egressd)"

[ "$(stat -c '%a %U %G' /run/egressd/api.sock)" = "660 root egressd" ] || fail "api.sock is not 0660 root:egressd"
gid=$(getent group egressd | cut -d: -f3)
setpriv --reuid=65534 --regid=65534 --groups="$gid" egressctl status >/dev/null || fail "a member of egressd cannot use the API"
if setpriv --reuid=65534 --regid=65534 --clear-groups egressctl status >/dev/null 2>&1; then
  fail "a non-member could use the API"
fi
ok "API socket: group egressd in, others out"

for _ in $(seq 50); do curl -sf http://127.0.0.1:9180/healthz >/dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:9180/healthz >/dev/null || fail "the collector does not answer"
egressctl logs sql "select count(*) as n from system.access.outbound_network" >/dev/null || fail "collector SQL"
ok "collector answers, DuckDB in $(readlink -f /var/lib/egress-collector)"

gen() { egressctl --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }
g0=$(gen)
systemctl reload egressd || fail "reload"
[ "$(gen)" -gt "$g0" ] || fail "reload applied no new generation"
ok "reload: generation $g0 -> $(gen)"

restarts() { systemctl show -p NRestarts --value egressd; }
r0=$(restarts)
systemctl kill -s KILL egressd
for _ in $(seq 100); do [ "$(restarts)" -gt "$r0" ] && systemctl is-active --quiet egressd && break; sleep 0.2; done
[ "$(restarts)" -gt "$r0" ] || fail "no restart after a crash"
systemctl is-active --quiet egressd || fail "not active after the crash restart"
nft list table inet egressd >/dev/null || fail "the table is gone after a crash"
ok "crash: restarted by Restart=on-failure, table kept"

cp -p "$CONFIG" "$CONFIG.smoke-backup"
sed -i 's/^deny_rcode = .*/deny_rcode = "BOGUS"/' "$CONFIG"
if systemctl restart egressd 2>/dev/null; then
  mv "$CONFIG.smoke-backup" "$CONFIG"
  fail "egressd started with an invalid config"
fi
nft list table inet egressd >/dev/null || { mv "$CONFIG.smoke-backup" "$CONFIG"; fail "a refused start removed the table"; }
mv "$CONFIG.smoke-backup" "$CONFIG"
systemctl restart egressd
wait_active egressd.service 30 || fail "egressd did not come back with the good config"
ok "bad config: refused by ExecStartPre, table kept; back with the good config"

systemctl stop egressd egress-collector
nft list table inet egressd >/dev/null || fail "stop removed the table"
ok "stop: table inet egressd stays in the kernel (fail closed)"

egressd uninstall-rules --yes >/dev/null
ok "units stopped and table removed: the test suite starts from a clean node"
