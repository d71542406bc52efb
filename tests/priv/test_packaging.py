"""Packaging: scripts/install.sh and scripts/uninstall.sh on this machine, and the systemd units.

The module installs egressd for real (apt packages if missing, the venv /opt/egressd, units,
group, directories, /etc/egressd) and always uninstalls it at the end. A machine that had egressd
installed before (the Vagrant box) gets its install, config and state back.

No systemd runs here (nor in CI), so the units cannot be started. Instead the daemon and the
collector are started with what their units grant them, read from the unit files: the same
capability sets and groups, no new privileges, a read-only file system except the unit's writable
paths, a private /tmp, and memory that cannot become executable (MemoryDenyWriteExecute). The
daemon runs in a scratch network namespace, so this machine's own ruleset is never touched."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
INSTALL = TOP / "scripts" / "install.sh"
UNINSTALL = TOP / "scripts" / "uninstall.sh"
PREFIX = Path("/opt/egressd")
UNITDIR = Path("/usr/lib/systemd/system")
UNITS = ("egressd.service", "egress-collector.service")
SYSUSERS = Path("/usr/lib/sysusers.d/egressd.conf")
TMPFILES = Path("/usr/lib/tmpfiles.d/egressd.conf")
COMMANDS = ("egressd", "egressctl", "egress-collector")
ETC = Path("/etc/egressd")
CONFIG = ETC / "egressd.toml"
STATE = Path("/var/lib/egressd")
RUN = Path("/run/egressd")
COLLECTOR_STATE = (Path("/var/lib/private/egress-collector"), Path("/var/lib/egress-collector"))
SYSTEMD_RUNNING = Path("/run/systemd/system").is_dir()

pytestmark = pytest.mark.slow


def sh(*cmd, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def group_exists(name: str = "egressd") -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    cur = None
    for raw in (UNITDIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert cur is not None, f"{name}: {line!r} outside a section"
        cur.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values and len(values) == 1, f"{key}: expected exactly one value, got {values}"
    return values[0]


# --- leaving the machine as it was ----------------------------------------------------------

class Machine:
    """What was here before the module ran, so that teardown can put it back."""

    def __init__(self) -> None:
        self.installed = (PREFIX / "bin" / "egressd").exists()
        self.gid = grp.getgrnam("egressd").gr_gid if group_exists() else None
        self.active = [u for u in UNITS if SYSTEMD_RUNNING and
                       sh("systemctl", "is-active", "--quiet", u, check=False).returncode == 0]
        self.backup = Path(tempfile.mkdtemp(prefix="egressd-pkg-backup-"))
        self.saved: list[Path] = []
        for p in (ETC, STATE, COLLECTOR_STATE[0]):
            if p.exists():
                dest = self.backup / p.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                sh("cp", "-a", p, dest)
                self.saved.append(p)

    def restore(self) -> None:
        if self.gid is not None and not group_exists():
            sh("groupadd", "--system", "--gid", self.gid, "egressd")
        if self.installed:
            sh(INSTALL)
        for p in self.saved:
            shutil.rmtree(p, ignore_errors=True)
            sh("cp", "-a", self.backup / p.relative_to("/"), p)
        shutil.rmtree(self.backup, ignore_errors=True)
        for u in self.active:
            sh("systemctl", "start", u, check=False)


class Install:
    def __init__(self, seconds: float, output: str) -> None:
        self.seconds = seconds
        self.output = output


@pytest.fixture(scope="module")
def machine():
    m = Machine()
    if m.installed or ETC.exists() or group_exists():
        sh(UNINSTALL, "--purge")  # start from a clean machine; restored at the end
    try:
        yield m
    finally:
        sh(UNINSTALL, "--purge", check=False)
        m.restore()


@pytest.fixture(scope="module")
def installed(machine):
    t0 = time.monotonic()
    r = sh(INSTALL)
    seconds = time.monotonic() - t0
    print(f"\nscripts/install.sh on a machine without egressd: {seconds:.1f}s")
    return Install(seconds, r.stdout + r.stderr)


@pytest.fixture(scope="module")
def netns():
    name = f"egpkg{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


# --- the units' sandbox, without systemd ---------------------------------------------------

SANDBOX = r"""#!/bin/bash
# sandbox.sh RW_PATH... -- SETPRIV_ARG... -- COMMAND...  (run under unshare -m: a private mount ns)
set -e
rw=(); while [ "$1" != "--" ]; do rw+=("$1"); shift; done; shift
sp=(); while [ "$1" != "--" ]; do sp+=("$1"); shift; done; shift
for d in "${rw[@]}"; do mount --bind "$d" "$d"; done
mount -t tmpfs -o mode=1777 tmpfs /tmp                      # PrivateTmp=
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
keep=" ${rw[*]} /tmp /var/tmp "
findmnt -rno TARGET | while read -r m; do                    # ProtectSystem=strict
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue;; esac
  case "$keep" in *" $m "*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
if touch /etc/.egressd-sandbox-probe 2>/dev/null; then rm -f /etc/.egressd-sandbox-probe; echo "sandbox: /etc is writable" >&2; exit 99; fi
exec setpriv "${sp[@]}" /usr/bin/python3 -c '
import ctypes, os, sys
if sys.argv[1] == "mdwe":  # MemoryDenyWriteExecute=yes: PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_MDWE) failed: errno %d" % ctypes.get_errno())
os.execv(sys.argv[2], sys.argv[2:])' "$@"
"""


def setpriv_caps(svc: dict[str, list[str]]) -> str:
    caps = one(svc, "CapabilityBoundingSet").split()
    return ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])


@pytest.fixture(scope="module")
def sandbox():
    """The sandbox script, outside /tmp (which the sandbox hides)."""
    work = Path(tempfile.mkdtemp(prefix="egressd-pkg-", dir="/run"))
    script = work / "sandbox.sh"
    script.write_text(SANDBOX)
    script.chmod(0o700)
    try:
        yield script
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sandboxed(script: Path, netns: str, svc: dict[str, list[str]], rw: list[str], setpriv: list[str],
              cmd: list[str]) -> list[str]:
    """The command line that runs cmd in netns with what the unit's [Service] section grants."""
    caps = setpriv_caps(svc)
    if one(svc, "NoNewPrivileges") == "yes":
        setpriv = ["--no-new-privs", *setpriv]
    setpriv += [f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]
    mdwe = "mdwe" if one(svc, "MemoryDenyWriteExecute") == "yes" else "-"
    return ["ip", "netns", "exec", netns, "unshare", "-m", "--propagation", "private",
            str(script), *rw, "--", *setpriv, "--", mdwe, *cmd]


class Notify:
    """The sd_notify socket a service manager would offer."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="egressd-pkg-notify-", dir="/run"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []

    def wait(self, needle: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, m in enumerate(self.messages):
                if needle in m:
                    del self.messages[: i + 1]
                    return True
            self.sock.settimeout(max(0.01, min(0.2, end - time.monotonic())))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        return False

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the tests, in order: install, check, run, reinstall, upgrade, uninstall -------------------

def test_install_puts_everything_in_place(installed):
    for c in COMMANDS:
        link = Path("/usr/local/bin") / c
        assert link.is_symlink() and os.readlink(link) == str(PREFIX / "bin" / c)
    for u in UNITS:
        assert (UNITDIR / u).read_text() == (TOP / "systemd" / u).read_text()
    assert SYSUSERS.read_text() == (TOP / "systemd" / "egressd.sysusers").read_text()
    assert TMPFILES.read_text() == (TOP / "systemd" / "egressd.tmpfiles").read_text()
    assert group_exists("egressd")
    # The directories carry the tmpfiles.d modes.
    modes = {}
    for line in TMPFILES.read_text().splitlines():
        f = line.split()
        if f and f[0] == "d":
            modes[f[1]] = (int(f[2], 8), f[3], f[4])
    assert set(modes) == {str(RUN), str(STATE)}
    for path, (mode, user, group) in modes.items():
        st = os.stat(path)
        assert stat.S_ISDIR(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, grp.getgrnam(group).gr_gid), path
        assert user == "root"
    # The commented default config, readable by root and the group only.
    from egressd.core.config import EXAMPLE_CONFIG

    st = CONFIG.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, grp.getgrnam("egressd").gr_gid)
    assert CONFIG.read_text().strip() == EXAMPLE_CONFIG.strip()
    assert (ETC / "policies.d").is_dir()
    assert "dns.upstreams is still the documentation address" in installed.output
    if not SYSTEMD_RUNNING:
        assert "units installed, not enabled" in installed.output


def test_the_three_commands_run(installed):
    env = dict(os.environ, PATH="/usr/local/bin:/usr/bin:/bin")
    r = sh("egressd", "--version", env=env)
    from egressd import __version__

    assert r.stdout.strip() == f"egressd {__version__}"
    assert "run" in sh("egressd", "--help", env=env).stdout
    assert "policies" in sh("egressctl", "--help", env=env).stdout
    assert "--db" in sh("egress-collector", "--help", env=env).stdout
    # The installed package is a copy, not the checkout (no editable install).
    r = sh(PREFIX / "bin" / "python", "-c", "import egressd; print(egressd.__file__)")
    assert r.stdout.startswith(str(PREFIX / "lib"))
    assert list((PREFIX / "lib").glob("python3*/site-packages/egressd/nft/*.nft"))


def test_default_config_passes_check_config(installed, tmp_path):
    # As shipped: the documentation address 203.0.113.2 is a valid IP, so the file validates ...
    r = sh("/usr/local/bin/egressd", "check-config", CONFIG)
    assert r.stdout.startswith("ok:")
    # ... and so does it once the operator puts a real resolver in.
    text = CONFIG.read_text()
    assert '"203.0.113.2:53"' in text
    mine = tmp_path / "egressd.toml"
    mine.write_text(text.replace('"203.0.113.2:53"', '"192.0.2.53", "[2001:db8::53]:53"'))
    assert sh("/usr/local/bin/egressd", "check-config", mine).stdout.startswith("ok:")
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('"203.0.113.2:53"', '"resolver.example"'))
    r = sh("/usr/local/bin/egressd", "check-config", bad, check=False)
    assert r.returncode == 2 and "dns.upstreams" in r.stderr


def test_systemd_analyze_verify_is_clean(installed):
    for u in UNITS:
        r = sh("systemd-analyze", "verify", "--man=no", UNITDIR / u, check=False)
        # Warnings (an unknown key, a typo) exit 0 but print: a clean unit prints nothing.
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"{u}:\n{r.stdout}{r.stderr}"
    r = sh("systemd-sysusers", "--dry-run", SYSUSERS, check=False)
    assert r.returncode == 0, r.stderr
    r = sh("systemd-tmpfiles", "--create", TMPFILES, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_egressd_unit_directives(installed):
    u = unit("egressd.service")
    un, svc, ins = u["Unit"], u["Service"], u["Install"]
    assert one(un, "Before") == "network-pre.target"
    assert one(un, "Wants") == "network-pre.target"
    assert one(svc, "Type") == "notify"
    assert re.fullmatch(r"\d+s", one(svc, "WatchdogSec")) and int(one(svc, "WatchdogSec")[:-1]) >= 10
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "ExecStart") == "/opt/egressd/bin/egressd run --config /etc/egressd/egressd.toml"
    assert one(svc, "ExecStartPre") == "/opt/egressd/bin/egressd check-config /etc/egressd/egressd.toml"
    assert one(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    # Stopping must leave the rules: nothing runs on stop.
    assert not {"ExecStop", "ExecStopPost"} & set(svc)
    want = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert set(one(svc, "CapabilityBoundingSet").split()) == want
    assert set(one(svc, "AmbientCapabilities").split()) == want
    assert one(svc, "SupplementaryGroups") == "egressd"
    assert "User" not in svc and "DynamicUser" not in svc  # root, with only the capabilities above
    assert one(svc, "NoNewPrivileges") == "yes"
    assert one(svc, "ProtectSystem") == "strict"
    assert one(svc, "ProtectHome") == "yes"
    assert one(svc, "PrivateTmp") == "yes"
    assert one(svc, "StateDirectory") == "egressd"
    assert one(svc, "RuntimeDirectory") == "egressd"
    assert set(one(svc, "ReadWritePaths").split()) == {"/var/lib/egressd", "/run/egressd"}
    assert one(svc, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert one(svc, "SystemCallArchitectures") == "native"
    assert one(svc, "SystemCallFilter") == "@system-service"
    for key in ("PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "RestrictNamespaces", "RestrictSUIDSGID", "LockPersonality",
                "MemoryDenyWriteExecute"):
        assert one(svc, key) == "yes", key
    # The API's peer check reads the caller's /proc/PID/status: /proc must stay visible.
    assert "ProtectProc" not in svc and "ProcSubset" not in svc
    assert one(ins, "WantedBy") == "multi-user.target"


def test_collector_unit_directives(installed):
    u = unit("egress-collector.service")
    svc = u["Service"]
    assert one(svc, "DynamicUser") == "yes"
    assert one(svc, "StateDirectory") == "egress-collector"
    assert one(svc, "CapabilityBoundingSet") == ""
    assert one(svc, "AmbientCapabilities") == ""
    exec_start = one(svc, "ExecStart").split()
    assert exec_start[0] == "/opt/egressd/bin/egress-collector"
    db = exec_start[exec_start.index("--db") + 1]
    assert db.startswith("/var/lib/egress-collector/"), "the database must be in the StateDirectory"
    assert exec_start[exec_start.index("--listen") + 1] == "127.0.0.1:9180"
    assert one(svc, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one(svc, "SystemCallArchitectures") == "native"
    assert one(svc, "SystemCallFilter") == "@system-service"
    assert one(svc, "MemoryDenyWriteExecute") == "yes"


def test_daemon_runs_with_the_units_sandbox(installed, netns, sandbox):
    """egressd, started as the unit starts it (capabilities, group, read-only /, MDWE): READY=1,
    the watchdog, reload, the API socket's group gate, and the rules staying after stop."""
    svc = unit("egressd.service")["Service"]
    gid = grp.getgrnam(one(svc, "SupplementaryGroups")).gr_gid
    rw = one(svc, "ReadWritePaths").split()
    cmd = one(svc, "ExecStart").split()
    notify = Notify()
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1")
    env.pop("JOURNAL_STREAM", None)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - read while the daemon writes it
    # ExecStartPre first, in the same sandbox.
    pre = one(svc, "ExecStartPre").split()
    r = sh(*sandboxed(sandbox, netns, svc, rw, ["--groups", str(gid)], pre), check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = subprocess.Popen(sandboxed(sandbox, netns, svc, rw, ["--groups", str(gid)], cmd),
                            stdout=log, stderr=subprocess.STDOUT, env=env)

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-6000:]

    try:
        assert notify.wait("READY=1", 30), f"no READY=1:\n{output()}"
        assert notify.wait("WATCHDOG=1", 3), "no WATCHDOG=1 within WATCHDOG_USEC/2"
        sock = RUN / "api.sock"
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
        # A member of the group uses the API; anyone else is kept out by the socket's mode.
        member = sh("setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}",
                    "/usr/local/bin/egressctl", "--json", "status", check=False)
        assert member.returncode == 0, member.stdout + member.stderr
        assert json.loads(member.stdout)["generation"] >= 1
        stranger = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      "/usr/local/bin/egressctl", "status", check=False)
        assert stranger.returncode == 2
        # ExecReload: SIGHUP gives RELOADING=1, then READY=1.
        proc.send_signal(signal.SIGHUP)
        assert notify.wait("RELOADING=1", 10), output()
        assert notify.wait("READY=1", 10), output()
        # The state directory was written through ProtectSystem=strict.
        assert (STATE / "spool").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()
    # Stopped: the table stays (fail closed).
    assert "table inet egressd" in sh("ip", "netns", "exec", netns, "nft", "list", "tables").stdout


def test_collector_runs_with_the_units_sandbox(installed, netns, sandbox):
    """egress-collector as its unit starts it: an unprivileged dynamic uid, no capabilities,
    read-only / except its state directory, MDWE."""
    svc = unit("egress-collector.service")["Service"]
    uid = 61184 + os.getpid() % 4000  # in systemd's DynamicUser range, unused in /etc/passwd
    state = Path(tempfile.mkdtemp(prefix="egressd-pkg-collector-", dir="/run"))
    os.chown(state, uid, uid)
    state.chmod(0o750)
    cmd = one(svc, "ExecStart").split()
    cmd[cmd.index("--db") + 1] = str(state / "outbound_network.duckdb")
    cmd[cmd.index("--listen") + 1] = "127.0.0.1:19180"
    proc = subprocess.Popen(
        sandboxed(sandbox, netns, svc, [str(state)], [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"], cmd),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = "http://127.0.0.1:19180"
        for _ in range(100):
            r = sh("ip", "netns", "exec", netns, "curl", "-sf", f"{url}/healthz", check=False)
            if r.returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            time.sleep(0.2)
        assert json.loads(r.stdout) == {"status": "ok"}
        r = sh("ip", "netns", "exec", netns, "curl", "-sf", "-H", "Content-Type: application/json",
               "-d", json.dumps({"query": "select count(*) from system.access.outbound_network"}), f"{url}/v1/sql")
        assert json.loads(r.stdout)["rows"] == [[0]]
        assert (state / "outbound_network.duckdb").stat().st_uid == uid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(state, ignore_errors=True)


def test_second_install_is_idempotent_and_keeps_the_config(installed):
    text = CONFIG.read_text().replace('"203.0.113.2:53"', '"192.0.2.53"')
    text = text.replace('account_id = "node-1"', 'account_id = "edited-by-operator"')
    CONFIG.write_text(text)
    (ETC / "policies.d" / "mine.json").write_text("{}")
    t0 = time.monotonic()
    r = sh(INSTALL)
    seconds = time.monotonic() - t0
    print(f"\nscripts/install.sh again, nothing changed: {seconds:.1f}s")
    assert "package up to date" in r.stdout
    assert "apt-get" not in r.stdout
    assert CONFIG.read_text() == text
    assert (ETC / "policies.d" / "mine.json").exists()
    for u in UNITS:
        assert (UNITDIR / u).read_text() == (TOP / "systemd" / u).read_text()
    assert "kept /etc/egressd/egressd.toml" in r.stdout
    assert "documentation address" not in r.stdout
    assert seconds < 30


def test_install_from_a_changed_checkout_upgrades_the_package(installed, tmp_path):
    """The upgrade path: a newer checkout reinstalls the package, and keeps the config."""
    src = tmp_path / "egressd"
    shutil.copytree(TOP, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                                 ".hypothesis", ".pytest_cache", ".ruff_cache",
                                                                 ".schemathesis", "bench", "build", "dist"))
    marker = f"# upgrade-marker {uuid.uuid4().hex}"
    with open(src / "daemon" / "egressd" / "__init__.py", "a") as f:
        f.write(f"\n{marker}\n")
    config = CONFIG.read_text()
    r = sh(src / "scripts" / "install.sh")
    assert "pip install" in r.stdout
    installed_init = next((PREFIX / "lib").glob("python3*/site-packages/egressd/__init__.py"))
    assert marker in installed_init.read_text()
    assert CONFIG.read_text() == config
    # Back to this checkout's code.
    r = sh(INSTALL)
    assert marker not in installed_init.read_text()


def test_uninstall_keeps_config_state_and_rules(installed, netns):
    # The sandboxed daemon left its table in netns; uninstall runs there, so its nft calls see it.
    r = sh("ip", "netns", "exec", netns, UNINSTALL)
    assert "kept the nftables table inet egressd" in r.stdout
    assert "table inet egressd" in sh("ip", "netns", "exec", netns, "nft", "list", "tables").stdout
    assert not PREFIX.exists()
    for c in COMMANDS:
        assert not (Path("/usr/local/bin") / c).exists() and not (Path("/usr/local/bin") / c).is_symlink()
    for u in UNITS:
        assert not (UNITDIR / u).exists()
    assert not SYSUSERS.exists() and not TMPFILES.exists()
    assert not RUN.exists()
    # Kept: the operator's config, the state, the group.
    assert "edited-by-operator" in CONFIG.read_text()
    assert (ETC / "policies.d" / "mine.json").exists()
    assert STATE.is_dir() and (STATE / "spool").is_dir()
    assert group_exists()


def test_reinstall_then_uninstall_purge_and_remove_rules(installed, netns):
    r = sh(INSTALL)
    assert "kept /etc/egressd/egressd.toml" in r.stdout  # an uninstall without --purge keeps it for this
    assert "edited-by-operator" in CONFIG.read_text()
    r = sh("ip", "netns", "exec", netns, UNINSTALL, "--remove-rules", "--purge")
    assert "the node is now OPEN" in r.stdout
    assert "table inet egressd" not in sh("ip", "netns", "exec", netns, "nft", "list", "tables").stdout
    for p in (PREFIX, ETC, STATE, RUN, SYSUSERS, TMPFILES, *COLLECTOR_STATE, *(UNITDIR / u for u in UNITS)):
        assert not p.exists(), p
    assert not group_exists()
    # A second uninstall finds nothing to do, and says so without failing.
    r = sh("ip", "netns", "exec", netns, UNINSTALL, "--remove-rules", "--purge")
    assert "no nftables table inet egressd to remove" in r.stdout
