"""atheris harness: egressd.core.dnsmsg on arbitrary bytes.

Contract (core/dnsmsg.py): the parsers raise DnsFormatError on garbage and nothing else, and a
message that parses as a query can always be answered.

    .venv/bin/python tests/fuzz/fuzz_dnsmsg.py /tmp/new tests/fuzz/corpus/dnsmsg -max_total_time=60
"""

from __future__ import annotations


import _harness  # tests/fuzz/_harness.py (the script's directory is on sys.path)
import atheris

with atheris.instrument_imports(include=["egressd"]):
    from egressd.core.dnsmsg import (
        deny_response,
        formerr_response,
        parse_answer,
        parse_query,
        servfail_response,
        truncate_for_udp,
        with_id,
    )
    from egressd.errors import DnsFormatError


def test_one_input(data: bytes) -> None:
    qid = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
    try:
        q = parse_query(data)
    except DnsFormatError:
        q = None
    for call in (
        lambda: parse_answer(data, qid, "www.example.com", 1),
        lambda: parse_answer(data, qid, q.qname, q.qtype) if q else None,
        lambda: formerr_response(data),
        lambda: with_id(data, 0xBEEF),
    ):
        try:
            call()
        except DnsFormatError:
            pass
    if q is not None:
        deny_response(q, 3, "Blocked by policy restricted-etl")
        servfail_response(q)
        truncate_for_udp(data, q)


if __name__ == "__main__":
    _harness.main(test_one_input)
