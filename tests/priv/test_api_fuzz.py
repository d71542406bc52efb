"""schemathesis against the served OpenAPI document of a daemon running in the lab: no 5xx.

It runs inside the node namespace against the daemon's TCP listener (bearer token), so every
generated request goes through the same middleware as the unix socket's."""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path

from egressd.lab import Lab, world
from egressd.lab.daemonproc import DaemonProc


def test_schemathesis_finds_no_server_error():
    with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
        token = Path(lab.tmpdir) / "api.token"
        token.write_text(secrets.token_hex(24))
        os.chmod(token, 0o600)
        d = DaemonProc(lab, world.write_config(lab, tcp_listen="127.0.0.1:9181", token_file=str(token)))
        d.start()
        try:
            st = str(Path(sys.executable).parent / "st")
            r = lab.run(
                lab.node_ns,
                [st, "run", "http://127.0.0.1:9181/api/2.0/openapi.json",
                 "-H", f"Authorization: Bearer {token.read_text()}",
                 "--checks", "not_a_server_error", "--max-examples", "60", "--seed", "1053",
                 "--request-timeout", "10", "--no-color"],
                timeout=400,
            )
            out = r.stdout + r.stderr
            assert r.returncode == 0, out[-6000:]
            print(out[-3000:])
            assert "Server error" not in out
            assert re.search(r"\b(\d{3,}) passed", out), out[-3000:]  # it really sent requests
            assert "INTERNAL_ERROR" not in d.log()
        finally:
            d.stop()
