"""atheris harness: egressd.core.policy.parse_policy on whatever JSON the bytes decode to.

Contract (core/policy.py): parse_policy raises ValidationError, listing every problem, and
nothing else. Bytes that are not JSON are not its business (the API refuses them before).

    .venv/bin/python tests/fuzz/fuzz_policy.py /tmp/new tests/fuzz/corpus/policy -max_total_time=60
"""

from __future__ import annotations

import json

import _harness  # tests/fuzz/_harness.py (the script's directory is on sys.path)
import atheris

with atheris.instrument_imports(include=["egressd"]):
    from egressd.core.policy import parse_policy
    from egressd.errors import ValidationError


def test_one_input(data: bytes) -> None:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        parse_policy(obj)
    except ValidationError as exc:
        assert exc.errors


if __name__ == "__main__":
    _harness.main(test_one_input)
