"""The API socket's group: without CAP_CHOWN (the systemd unit's bounding set) the daemon can give
its socket only to a group it is in, and says so plainly instead of a bare EPERM traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SERVE = textwrap.dedent(
    """
    import asyncio, os, sys
    from aiohttp import web
    from egressd.api.server import serve
    from egressd.errors import EgressdError
    async def main():
        try:
            r = await serve(web.Application(), socket_path=sys.argv[1], socket_gid=int(sys.argv[2]), tcp=None)
        except EgressdError as e:
            print("refused:", e)
            print("left:", os.path.exists(sys.argv[1]))
            return
        st = os.stat(sys.argv[1])
        print("served: gid", st.st_gid, "mode", oct(st.st_mode & 0o777))
        await r.cleanup()
    asyncio.run(main())
    """
)


@pytest.fixture
def setpriv():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux)")
    return shutil.which("setpriv")


def test_without_cap_chown_a_foreign_group_is_refused_with_a_clear_error(setpriv, tmp_path):
    sock = tmp_path / "api.sock"
    r = subprocess.run([setpriv, "--bounding-set=-chown", sys.executable, "-c", SERVE, str(sock), "65534"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "refused: cannot give the API socket" in r.stdout and "SupplementaryGroups=" in r.stdout, r.stdout
    assert "left: False" in r.stdout  # no half-made socket is left behind


def test_in_the_group_without_cap_chown_works(setpriv, tmp_path):
    sock = tmp_path / "api.sock"
    r = subprocess.run([setpriv, "--bounding-set=-chown", "--groups=65534", sys.executable, "-c", SERVE,
                        str(sock), "65534"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "served: gid 65534 mode 0o660" in r.stdout, r.stdout
