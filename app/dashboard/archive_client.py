"""The DICOMweb client of the image archive (``dicomweb-client``): one attempt per request, HTTP
failures as one :class:`ArchiveError` in words, and query strings (they carry patient names)
withheld from the log records of ``dicomweb-client`` and ``urllib3``. ``dicomweb-client`` is
optional: without it the page says how to install it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from app.dashboard.errors import DashboardError

UID_CHARS = set("0123456789.")
MAX_UID_CHARS = 64  # PS3.5 9.1
# Filters apply to records logged on the logger itself, not on its children: the modules that log.
LOGGERS_WITH_URLS = ("dicomweb_client.web", "urllib3.connectionpool")
T = TypeVar("T")


class ArchiveError(DashboardError):
    """The archive cannot be reached, or the study cannot be read from it."""


class _WithholdQueries(logging.Filter):
    """Replace query strings in log records by ``?...``: QIDO-RS queries carry patient names."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = re.sub(r"\?[^\s\"']*", "?...", message), ()
        return True


_WITHHOLD = _WithholdQueries()


def _session() -> Any:
    """A requests session that leaves ``*`` unescaped in query strings.

    Orthanc's DICOMweb plugin (1.7, Debian's) does not percent-decode query values, so a
    wildcard sent as ``%2A`` matches nothing; ``*`` is legal as it is in a query (RFC 3986,
    sub-delims), so servers that decode see the same value.
    """
    import requests

    class WildcardSession(requests.Session):
        def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
            prepared = super().prepare_request(request)
            url = prepared.url or ""
            head, sep, query = url.partition("?")
            prepared.url = head + sep + query.replace("%2A", "*")
            return prepared

    return WildcardSession()


def client(url: str) -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ArchiveError(
            "reading from the image archive needs the dicomweb-client package: ask IT to "
            "install it (pip install dicomweb-client) and restart the dashboard"
        ) from None
    for name in LOGGERS_WITH_URLS:
        logger = logging.getLogger(name)
        if _WITHHOLD not in logger.filters:
            logger.addFilter(_WITHHOLD)
    client = DICOMwebClient(url=url, chunk_size=10**6, session=_session())
    # A clinician is waiting on the page: one attempt, and a message, rather than five retries
    # with exponential waits.
    client.set_http_retry_params(retry=False)
    return client


@contextmanager
def reading(url: str) -> Iterator[None]:
    """Turn HTTP and connection failures into one :class:`ArchiveError` that says what to do."""
    import requests  # a dependency of dicomweb-client, there once the client imports

    try:
        yield
    except requests.RequestException as exc:
        reason = getattr(getattr(exc, "response", None), "status_code", None)
        detail = f"HTTP {reason}" if reason else "no answer"
        raise ArchiveError(
            f"the image archive at {url} could not be read ({detail}): check the address with IT"
        ) from exc


def call(url: str, action: Callable[[Any], T]) -> T:
    found = client(url)
    with reading(url):
        return action(found)


def check_uid(uid: str, *, what: str = "Study Instance UID") -> str:
    """The UID without surrounding blanks.

    Raises:
        ArchiveError: empty, longer than 64 characters, or not digits and dots.
    """
    value = uid.strip()
    if not value or not set(value) <= UID_CHARS or len(value) > MAX_UID_CHARS:
        raise ArchiveError(
            f"a {what} is up to {MAX_UID_CHARS} digits and dots, got {uid!r}: copy it from "
            "the archive viewer"
        )
    return value


def value(item: dict[str, Any], keyword: str) -> Any:
    """The first value of a DICOM JSON attribute (PS3.18 F.2), or None."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    values = item.get(f"{tag:08X}", {}).get("Value") if tag is not None else None
    if not values:
        return None
    first = values[0]
    return first.get("Alphabetic", "") if isinstance(first, dict) else first


def values(item: dict[str, Any], keyword: str) -> list[Any]:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return list(item.get(f"{tag:08X}", {}).get("Value") or []) if tag is not None else []
