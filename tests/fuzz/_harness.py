"""What every atheris harness here shares: bytes to text, and the libFuzzer entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris


def text(data: bytes) -> str:
    """The input as text: UTF-8 when it is, else latin-1 (every byte string is one)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def main(test_one_input: Callable[[bytes], None]) -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
