"""atheris harness: egressd.core.nflog.parse_messages on arbitrary bytes.

Contract (core/nflog.py): parse_messages never raises; what it cannot decode is counted in
``garbled``.

    .venv/bin/python tests/fuzz/fuzz_nflog.py /tmp/new tests/fuzz/corpus/nflog -max_total_time=60
"""

from __future__ import annotations


import _harness  # tests/fuzz/_harness.py (the script's directory is on sys.path)
import atheris

with atheris.instrument_imports(include=["egressd"]):
    from egressd.core.nflog import parse_messages


def test_one_input(data: bytes) -> None:
    parsed = parse_messages(data)
    assert parsed.garbled >= 0


if __name__ == "__main__":
    _harness.main(test_one_input)
