"""schemathesis against the served OpenAPI document of a real egress-collector process on a
loopback port: no 5xx, and every answer matches the document (status codes, content types,
response schemas). Unprivileged: the collector needs no root.

The daemon's API gets the same treatment in tests/priv/test_api_fuzz.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ST = Path(sys.executable).parent / "st"
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance",
])


def start_collector(db: Path, log: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "egressd.collector.cli", "--listen", "127.0.0.1:0", "--db", str(db),
         "--sql-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"collector exited with {proc.wait()}: {''.join(log)}")
        log.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "collector.listening":
            threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
            return proc, int(record["port"])
    proc.kill()
    raise AssertionError("collector did not start")


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_the_document_holds(tmp_path):
    if not ST.exists():
        pytest.skip(f"schemathesis CLI not found at {ST}")
    log: list[str] = []
    proc, port = start_collector(tmp_path / "fuzz.duckdb", log)
    base = f"http://127.0.0.1:{port}"
    try:
        r = subprocess.run(
            [str(ST), "run", f"{base}/v1/openapi.json", "--checks", CHECKS,
             "--max-examples", "60", "--seed", "1053", "--request-timeout", "20", "--no-color"],
            capture_output=True, text=True, timeout=500, cwd=tmp_path, check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        assert "Server error" not in out
        cases = re.search(r"(\d+) generated, (\d+) passed", out)
        assert cases and int(cases.group(1)) >= 300 and cases.group(1) == cases.group(2), out[-3000:]
        assert re.search(r"Operations:\s+5 selected / 5 total", out), out[:2000]
        # The collector survived it, answers, and logged no crash.
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as h:
            assert h.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as m:
            metrics = m.read().decode()
        assert not re.search(r'code="5\d\d"', metrics), metrics
        print(f"schemathesis: {cases.group(1)} requests, all passed")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    text = "".join(log)
    assert "request_crashed" not in text, text[-4000:]
    # The only tracebacks allowed are aiohttp's own for requests its HTTP parser refused with a
    # 400 before any handler ran (schemathesis probes a NUL byte in a header).
    assert text.count("Traceback") == text.count("aiohttp.http_exceptions.BadHttpMessage"), text[-4000:]
    assert code == 0
