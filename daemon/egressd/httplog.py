"""The logger our aiohttp servers hand to aiohttp for the errors it logs itself.

aiohttp logs a request its HTTP parser refuses ("Error handling request", BadHttpMessage,
LineTooLong, InvalidHeader...) with the exception's text, which quotes the offending bytes: a
malformed ``Authorization`` header would put the bearer token in the journal. This logger keeps
the fact (the exception's type and status) and drops its text and traceback.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError


class _RedactParserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "http_request_refused: malformed HTTP request (%s, status %s); its bytes are not logged"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def server_logger(name: str) -> logging.Logger:
    """A logger for ``web.AppRunner(logger=...)`` that never logs refused requests' bytes."""
    lg = logging.getLogger(name)
    if not any(isinstance(f, _RedactParserErrors) for f in lg.filters):
        lg.addFilter(_RedactParserErrors())
    return lg
