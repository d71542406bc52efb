"""Name normalization, pattern validation and NameMatcher."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.core.names import NameMatcher, normalize_name, normalize_pattern

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("  example.com \n", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("bücher。example", "xn--bcher-kva.example"),  # ideographic full stop (UTS #46)
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("localhost", "localhost"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),  # 253
        ("123.example", "123.example"),
    ],
)
def test_normalize_name_valid(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty name"),
        ("   ", "empty name"),
        (".", "empty name"),
        ("example.com..", "empty label"),
        (".example.com", "empty label"),
        ("a..b", "empty label"),
        ("a" * 64 + ".com", "at most 63"),
        (".".join(["a" * 63] * 3 + ["b" * 62]), "at most 253"),
        ("exa mple.com", "only letters, digits"),
        ("example.com/path", "only letters, digits"),
        ("ex*ample.com", "only letters, digits"),
        ("user@example.com", "only letters, digits"),
        ("☃.example", "not a valid internationalized"),
    ],
)
def test_normalize_name_invalid(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        normalize_name(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pypi.org", "pypi.org"),
        ("*.example.com", "*.example.com"),
        ("*.Example.COM.", "*.example.com"),
        (" *.bücher.example ", "*.xn--bcher-kva.example"),
        ("*.co.uk", "*.co.uk"),
        ("*.a.b.c.d", "*.a.b.c.d"),
    ],
)
def test_normalize_pattern_valid(raw: str, expected: str) -> None:
    assert normalize_pattern(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("*", "bare '\\*' would match every name"),
        ("*.", "bare '\\*' would match every name"),
        ("*..", "needs a domain after"),
        ("*.*.com", "allowed only once"),
        ("foo*.com", "only as the whole first label"),
        ("*foo.com", "only as the whole first label"),
        ("a.*.com", "only as the whole first label"),
        ("example.*", "only as the whole first label"),
        ("**.example.com", "only as the whole first label"),
        ("*.com", "too broad"),
        ("*.com.", "too broad"),
        ("*.exa mple.com", "only letters, digits"),
        ("", "empty name"),
    ],
)
def test_normalize_pattern_invalid(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_pattern(raw)


MATCHER = NameMatcher(
    [
        ("example.com", "exact apex"),
        ("*.example.com", "wild example.com"),
        ("*.deep.example.com", "wild deep"),
        ("api.deep.example.com", "exact api.deep"),
        ("*.other.org", "wild other"),
        ("*.other.org", "duplicate ignored"),
        ("pypi.org", "pypi"),
    ]
)


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("example.com", "exact apex"),
        ("a.example.com", "wild example.com"),  # depth 1
        ("a.b.example.com", "wild example.com"),  # depth 2
        ("a.b.c.example.com", "wild example.com"),  # depth 3
        ("deep.example.com", "wild example.com"),  # apex of *.deep is not matched by it
        ("x.deep.example.com", "wild deep"),  # longest suffix wins
        ("x.y.deep.example.com", "wild deep"),
        ("api.deep.example.com", "exact api.deep"),  # exact beats wildcard
        ("other.org", None),  # wildcard never matches its apex
        ("a.other.org", "wild other"),  # first tag of a duplicate pattern kept
        ("pypi.org", "pypi"),
        ("files.pypi.org", None),  # exact entries do not cover subdomains
        ("notexample.com", None),  # suffix match is on label boundaries
        ("example.com.evil", None),
        ("com", None),
    ],
)
def test_matcher(name: str, tag: str | None) -> None:
    assert MATCHER.match(name) == tag


def test_matcher_empty_and_len() -> None:
    assert NameMatcher([]).match("example.com") is None
    assert len(MATCHER) == 6


def test_matcher_falsy_tag_is_a_match() -> None:
    assert NameMatcher([("a.b", 0), ("*.c.d", "")]).match("a.b") == 0
    assert NameMatcher([("*.c.d", "")]).match("x.c.d") == ""


# -- properties ---------------------------------------------------------------------------------


@given(st.text(max_size=80))
def test_normalize_name_idempotent_on_any_text(text: str) -> None:
    try:
        once = normalize_name(text)
    except ValueError:
        return
    assert normalize_name(once) == once
    assert once.isascii() and once == once.lower() and not once.endswith(".")


@given(NAME, st.data())
def test_normalize_name_case_and_trailing_dot_invariant(name: str, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    variant = "".join(c.upper() if f else c for c, f in zip(name, flips)) + data.draw(st.sampled_from(["", "."]))
    assert normalize_name(variant) == normalize_name(name) == name


@given(st.text(max_size=60))
def test_normalize_pattern_idempotent(text: str) -> None:
    try:
        once = normalize_pattern(text)
    except ValueError:
        return
    assert normalize_pattern(once) == once


@given(NAME.filter(lambda n: "." in n), st.lists(LABEL, min_size=1, max_size=4))
def test_wildcard_matches_every_subdomain_but_not_apex(suffix: str, prefix: list[str]) -> None:
    matcher = NameMatcher([(f"*.{suffix}", "w")])
    assert matcher.match(suffix) is None
    assert matcher.match(".".join(prefix) + "." + suffix) == "w"


def _reference_match(entries: list[tuple[str, int]], name: str) -> int | None:
    """Scan every pattern: exact first, then the longest matching wildcard suffix, first tag on ties."""
    for pattern, tag in entries:
        if pattern == name:
            return tag
    best: tuple[int, int] | None = None
    for pattern, tag in entries:
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            if best is None or len(pattern) > best[0]:
                best = (len(pattern), tag)
    return None if best is None else best[1]


SMALL_LABEL = st.sampled_from(["a", "b", "c", "example"])
SMALL_NAME = st.lists(SMALL_LABEL, min_size=1, max_size=4).map(".".join)
SMALL_PATTERN = st.one_of(SMALL_NAME, SMALL_NAME.map(lambda n: "*." + n))


@given(st.lists(SMALL_PATTERN, max_size=8), SMALL_NAME)
def test_matcher_agrees_with_linear_scan(patterns: list[str], name: str) -> None:
    entries = [(p, i) for i, p in enumerate(patterns)]
    assert NameMatcher(entries).match(name) == _reference_match(entries, name)
