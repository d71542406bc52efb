"""The lab fixture: namespaces, dnsmasq, web servers, and egressd running in the node namespace."""

from __future__ import annotations

import pytest

from egressd.lab import Lab
from egressd.lab import world
from egressd.lab.apiclient import call
from egressd.lab.collectorproc import CollectorProc
from egressd.lab.daemonproc import DaemonProc


class Env:
    def __init__(self, lab: Lab, daemon: DaemonProc, config, collector: CollectorProc) -> None:
        self.lab = lab
        self.daemon = daemon
        self.config = config
        self.collector = collector
        self.w1, self.w2, self.w3, self.w4 = lab.workloads[:4]  # restricted / dry-run / full access / unregistered

    def api(self, method: str, path: str, body=None) -> tuple[int, object]:
        return call(str(self.config.parent / "api.sock"), method, path, body)

    def nft(self, *args: str) -> str:
        return self.lab.run(self.lab.node_ns, ["nft", *args], check=True).stdout


@pytest.fixture(scope="module")
def env(request):
    """The lab and its daemon. Indirect parametrization may add [dns] settings, as a dict:
    ``@pytest.mark.parametrize("env", [{"rate_limit_qps": 0}], indirect=True)``."""
    dns_extra = getattr(request, "param", None) or {}
    # w4 is never registered: its traffic must be left alone.
    with Lab(workloads=4, records=world.records(), cnames=world.CNAMES) as lab:
        collector = CollectorProc(lab)
        collector.start()
        config = world.write_config(lab, collector_url=collector.url)
        if dns_extra:
            text = config.read_text()
            assert "[dns]\n" in text
            extra = "".join(f"{k} = {v!r}\n" for k, v in dns_extra.items())
            config.write_text(text.replace("[dns]\n", "[dns]\n" + extra, 1))
        daemon = DaemonProc(lab, config)
        daemon.start()
        try:
            yield Env(lab, daemon, config, collector)
        finally:
            daemon.stop()
            collector.stop()


class ScratchNs:
    """A throw-away network namespace, with a libnftables context bound to it. The context's
    netlink socket is opened inside the namespace, so the test process itself never moves."""

    def __init__(self) -> None:
        import subprocess
        import uuid

        from egressd.netns import entered
        from egressd.libnft import Nft

        self.name = f"egt{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        with entered(self.name):
            self.nft = Nft()

    def ruleset(self) -> str:
        import subprocess

        return subprocess.run(["ip", "netns", "exec", self.name, "nft", "list", "ruleset"],
                              capture_output=True, text=True, check=True).stdout

    def close(self) -> None:
        import subprocess

        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def scratch_ns():
    ns = ScratchNs()
    try:
        yield ns
    finally:
        ns.close()
