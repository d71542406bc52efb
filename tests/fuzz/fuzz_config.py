"""atheris harness: egressd.core.config.parse_config on arbitrary TOML text.

Contract (core/config.py): parse_config raises ValidationError (TOML syntax errors included, with
their line) and nothing else.

    .venv/bin/python tests/fuzz/fuzz_config.py /tmp/new tests/fuzz/corpus/config -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["egressd", "tomllib"]):
    from egressd.core.config import parse_config
    from egressd.errors import ValidationError


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    try:
        parse_config(text, "egressd.toml")
    except ValidationError as exc:
        assert exc.errors


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
