"""atheris harness: egressd.collector.sqlguard.translate on arbitrary query text.

Contract (collector/sqlguard.py): translate raises ValidationError (and nothing else) when a
query is refused or cannot be read.

    .venv/bin/python tests/fuzz/fuzz_sqlguard.py /tmp/new tests/fuzz/corpus/sqlguard -max_total_time=60
"""

from __future__ import annotations


import _harness  # tests/fuzz/_harness.py (the script's directory is on sys.path)
import atheris

with atheris.instrument_imports(include=["egressd", "sqlglot"]):
    from egressd.collector.sqlguard import translate
    from egressd.errors import ValidationError


def test_one_input(data: bytes) -> None:
    text = _harness.text(data)
    try:
        translate(text, 10)
    except ValidationError:
        pass


if __name__ == "__main__":
    _harness.main(test_one_input)
