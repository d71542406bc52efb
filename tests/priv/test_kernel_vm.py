"""The kernel interface on Debian 12's own kernel (6.1), in a qemu VM (scripts/kernel-vm.sh).

This machine's kernel is newer than a Debian 12 node's, and the daemon's kernel interface may take
a different path on each: from Linux 6.3 the set writer deletes expired answers with
NFT_MSG_DESTROYSETELEM, before that with an add of the bare key and a delete;
tests/priv/test_nftset.py asserts which path it took for the kernel it runs on. Here the tests of
the kernel interface (set elements over nfnetlink, the whole ruleset loaded and read back, NFLOG
decoded from real traffic) run on Debian 12's kernel, so the path a node takes is tested on the
kernel it takes it on, not by faking the kernel's EINVAL.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
FILES = ("tests/priv/test_nftset.py", "tests/priv/test_ruleset_kernel.py", "tests/priv/test_nflog_capture.py")


def test_the_kernel_interface_on_debian_12s_kernel():
    r = subprocess.run([str(TOP / "scripts" / "kernel-vm.sh"), *FILES],
                       capture_output=True, text=True, timeout=2400, env=dict(os.environ, CI="true"))
    out = r.stdout.replace("\r", "") + r.stderr
    assert r.returncode == 0, out[-6000:]
    kernel = re.search(r"GUEST_KERNEL=(\S+)", out)
    assert kernel and kernel.group(1).startswith("6.1."), out[-3000:]
    summary = re.search(r"^=+ (.*) in [0-9.]+s", out, re.MULTILINE)
    assert summary, out[-3000:]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (\w+)", summary.group(1)))
    # every test of the file ran and passed (CI=true in the guest turns a skip into a failure)
    assert counts.get("passed", 0) >= 40 and set(counts) == {"passed"}, summary.group(0)
