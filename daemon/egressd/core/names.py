"""DNS names and DNS_NAME patterns: normalization and matching.

A *name* is compared in one canonical form: lower-case ASCII, no trailing dot, Unicode labels in
punycode (IDNA 2008 with the UTS #46 mapping, non-transitional, as curl/libidn2 and browsers encode
them). A *pattern* is a name or ``*.`` + name; ``*.example.com`` matches every name below
example.com, at any depth, but not example.com itself.

``NameMatcher`` answers "which pattern matches this name?" in O(labels): one dict lookup for the
exact name, then one per proper suffix for wildcards, longest suffix first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

import idna

__all__ = ["MAX_NAME_LENGTH", "MAX_LABEL_LENGTH", "normalize_name", "normalize_pattern", "NameMatcher"]

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LABEL_RE = re.compile(r"[a-z0-9_-]+")
# An already-canonical ASCII name (the common case, and the DNS hot path): no per-label work.
_PLAIN_NAME_RE = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")

T = TypeVar("T")


def _encode_label(label: str) -> str:
    """Return one already-mapped label in ASCII form, or raise ValueError."""
    if not label:
        raise ValueError("empty label")
    if not label.isascii():
        try:
            label = idna.alabel(label).decode("ascii")
        except UnicodeError as exc:  # idna.IDNAError and codec errors
            raise ValueError(f"label {label!r} is not a valid internationalized label ({exc})") from None
    if len(label) > MAX_LABEL_LENGTH:
        raise ValueError(f"label {label[:20]!r}... is {len(label)} characters long (at most {MAX_LABEL_LENGTH})")
    if not _LABEL_RE.fullmatch(label):
        raise ValueError(f"label {label!r} may contain only letters, digits, '-' and '_'")
    return label


def normalize_name(name: str) -> str:
    """Return the canonical form of a DNS name, or raise ValueError saying why it is invalid.

    Strips surrounding whitespace, lower-cases, drops one trailing dot and converts Unicode labels
    to punycode. Labels are 1-63 characters of ``[a-z0-9_-]``; the whole name at most 253.
    """
    text = name.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if len(text) <= MAX_NAME_LENGTH and _PLAIN_NAME_RE.fullmatch(text):
        return text
    text = name.strip()
    if not text.isascii():
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except UnicodeError as exc:  # idna.IDNAError and codec errors
            raise ValueError(f"not a valid internationalized name ({exc})") from None
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty name")
    result = ".".join(_encode_label(label) for label in text.split("."))
    if len(result) > MAX_NAME_LENGTH:
        raise ValueError(f"name is {len(result)} characters long (at most {MAX_NAME_LENGTH})")
    return result


def normalize_pattern(text: str) -> str:
    """Return the canonical form of a DNS_NAME pattern (a name, or ``*.`` + name), or raise ValueError."""
    stripped = text.strip()
    if stripped in ("*", "*."):
        raise ValueError("a bare '*' would match every name: use restriction_mode FULL_ACCESS instead")
    if stripped.startswith("*."):
        rest = stripped[2:]
        if "*" in rest:
            raise ValueError("'*' is allowed only once, as the whole first label ('*.example.com')")
        if not rest.strip(". "):
            raise ValueError("a wildcard needs a domain after '*.'")
        suffix = normalize_name(rest)
        if "." not in suffix:
            raise ValueError(f"'*.{suffix}' is too broad: a wildcard needs at least two labels after '*.'")
        return "*." + suffix
    if "*" in stripped:
        raise ValueError("'*' is allowed only as the whole first label, followed by a domain ('*.example.com')")
    return normalize_name(stripped)


def _proper_suffixes(name: str) -> Iterable[str]:
    """Yield the proper suffixes of a name, longest first: a.b.c -> b.c, c."""
    start = name.find(".")
    while start != -1:
        yield name[start + 1 :]
        start = name.find(".", start + 1)


class NameMatcher(Generic[T]):
    """Maps normalized DNS_NAME patterns to tags and finds the best match for a name.

    Exact names win over wildcards; among wildcards the longest suffix wins. When the same
    pattern is given twice, the first tag is kept.
    """

    def __init__(self, entries: Iterable[tuple[str, T]] = ()):
        self._exact: dict[str, T] = {}
        self._wild: dict[str, T] = {}
        for pattern, tag in entries:
            if pattern.startswith("*."):
                self._wild.setdefault(pattern[2:], tag)
            else:
                self._exact.setdefault(pattern, tag)

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)

    def match(self, name: str) -> T | None:
        """Return the tag of the best pattern matching an already-normalized name, or None."""
        tag = self._exact.get(name)
        if tag is not None or name in self._exact:
            return tag
        if not self._wild:
            return None
        for suffix in _proper_suffixes(name):
            if suffix in self._wild:
                return self._wild[suffix]
        return None
