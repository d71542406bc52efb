"""The lab fixture: namespaces, dnsmasq, web servers, and egressd running in the node namespace."""

from __future__ import annotations

import pytest

from egressd.lab import Lab
from egressd.lab import world
from egressd.lab.daemonproc import DaemonProc


class Env:
    def __init__(self, lab: Lab, daemon: DaemonProc, config) -> None:
        self.lab = lab
        self.daemon = daemon
        self.config = config
        self.w1, self.w2, self.w3 = lab.workloads[:3]  # restricted / dry-run / full access

    def nft(self, *args: str) -> str:
        return self.lab.run(self.lab.node_ns, ["nft", *args], check=True).stdout


@pytest.fixture(scope="module")
def env():
    with Lab(workloads=3, records=world.records(), cnames=world.CNAMES) as lab:
        config = world.write_config(lab)
        daemon = DaemonProc(lab, config)
        daemon.start()
        try:
            yield Env(lab, daemon, config)
        finally:
            daemon.stop()
