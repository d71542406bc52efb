"""Runs each atheris harness in tests/fuzz/ for a bounded time from its seed corpus: no crash.

A crash is any exception outside the parser's contract (DnsFormatError, ValidationError, or
nothing at all for the NFLOG parser). The five harnesses run at once, as subprocesses, each
bounded by a run count and a wall-clock budget. New inputs the fuzzer finds go to a scratch
directory, so the committed corpus does not change; a crashing input is copied next to the
test's tmp_path and its path is in the failure message, with the command that replays it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is a test dependency (pip install 'atheris>=2.3')")

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
# name -> (max runs, max seconds). The pure parsers run ~10k-20k inputs/s, the TOML parser ~3k/s,
# sqlglot a few hundred per second.
BUDGET = {
    "dnsmsg": (200_000, 15),
    "nflog": (200_000, 15),
    "policy": (200_000, 15),
    "config": (40_000, 15),
    "sqlguard": (20_000, 15),
}
MIN_RUNS = 1_000  # fewer means the harness did not really fuzz


class Run:
    def __init__(self, name: str, scratch: Path) -> None:
        runs, seconds = BUDGET[name]
        self.name = name
        self.new = scratch / name / "new"
        self.artifacts = scratch / name / "artifacts"
        self.new.mkdir(parents=True)
        self.artifacts.mkdir(parents=True)
        self.argv = [
            sys.executable, str(FUZZ / f"fuzz_{name}.py"), str(self.new), str(FUZZ / "corpus" / name),
            f"-runs={runs}", f"-max_total_time={seconds}", "-seed=1053", "-timeout=10",
            "-rss_limit_mb=2048", f"-artifact_prefix={self.artifacts}/", "-print_final_stats=1",
        ]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=BUDGET[self.name][1] + 90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            return -9, out + "\n(killed: the harness overran its time budget)"
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def runs():
    scratch = Path(tempfile.mkdtemp(prefix="egressd-fuzz-"))
    started = {name: Run(name, scratch) for name in BUDGET}
    try:
        yield started
    finally:
        for r in started.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def test_every_harness_has_a_seed_corpus():
    for name in BUDGET:
        assert (FUZZ / f"fuzz_{name}.py").is_file()
        seeds = list((FUZZ / "corpus" / name).iterdir())
        assert len(seeds) >= 4, f"{name}: only {len(seeds)} seeds"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUDGET))
def test_harness_finds_no_crash(runs, name, tmp_path):
    run = runs[name]
    code, out = run.result()
    crashes = sorted(run.artifacts.iterdir())
    kept = [shutil.copy(c, tmp_path / c.name) for c in crashes]
    replay = " ".join([*run.argv[:2], *map(str, kept)]) if kept else ""
    assert code == 0 and not crashes, (
        f"fuzz_{name} crashed (exit {code}); inputs kept: {kept}\nreplay: {replay}\n{out[-5000:]}")
    seeds = re.search(r"INFO:\s+(\d+) files found in \S*corpus/" + name, out)
    assert seeds and int(seeds.group(1)) >= 4, out[-3000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert done, out[-3000:]
    assert int(done.group(1)) >= MIN_RUNS, f"fuzz_{name}: only {done.group(1)} runs\n{out[-3000:]}"
    print(f"fuzz_{name}: {done.group(1)} runs in {done.group(2)} s")
