"""Logging for every modelfleet process: one readable format, and a filter that masks known secrets.

Secrets are kept out of log calls by construction (URLs are logged through `safe_redis_url`, keys never);
the filter is the second line of defence, so that a secret that slips into a message or an exception's text
still never reaches the log.
"""

import logging
import sys
from collections.abc import Iterable

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class SecretMask(logging.Filter):
    """Replace every occurrence of a known secret in a record's final text with `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        masked, exc_text = text, record.exc_text or ""
        for secret in self._secrets:
            masked = masked.replace(secret, "***")
            exc_text = exc_text.replace(secret, "***")
        record.msg, record.args = masked, None
        if record.exc_text:
            record.exc_text = exc_text
        return True


def configure_logging(secrets: Iterable[str] = (), level: int = logging.INFO) -> None:
    """Send every logger to stderr in one format, masking `secrets`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(SecretMask(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request it sends at INFO: for the head, one line per prompt proxied to a node, beside the
    # access log's line for the same prompt. Its warnings still show.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
