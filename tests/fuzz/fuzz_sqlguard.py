"""atheris harness: egressd.collector.sqlguard.translate on arbitrary query text.

Contract (collector/sqlguard.py): translate raises ValidationError (and nothing else) when a
query is refused or cannot be read.

    .venv/bin/python tests/fuzz/fuzz_sqlguard.py /tmp/new tests/fuzz/corpus/sqlguard -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["egressd", "sqlglot"]):
    from egressd.collector.sqlguard import translate
    from egressd.errors import ValidationError


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    try:
        translate(text, 10)
    except ValidationError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
