"""atheris harness: egressd.core.config.parse_config on arbitrary TOML text.

Contract (core/config.py): parse_config raises ValidationError (TOML syntax errors included, with
their line) and nothing else.

    .venv/bin/python tests/fuzz/fuzz_config.py /tmp/new tests/fuzz/corpus/config -max_total_time=60
"""

from __future__ import annotations


import _harness  # tests/fuzz/_harness.py (the script's directory is on sys.path)
import atheris

with atheris.instrument_imports(include=["egressd", "tomllib"]):
    from egressd.core.config import parse_config
    from egressd.errors import ValidationError


def test_one_input(data: bytes) -> None:
    text = _harness.text(data)
    try:
        parse_config(text, "egressd.toml")
    except ValidationError as exc:
        assert exc.errors


if __name__ == "__main__":
    _harness.main(test_one_input)
