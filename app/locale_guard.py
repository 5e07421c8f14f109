"""The caller's C locale, kept across native libraries that switch it.

OpenVINO's IR reader and GDCM (SimpleITK's DICOM reader) set the process-wide C locale to "C" and
back while they parse; when two parses overlap (graphs compiled side by side in threads), or when a
library does not switch back, the caller's process is left in the ASCII "C" locale, and its text
pipes and ``open()`` calls without an encoding then fail on UTF-8. Every call into them that
parses files goes through :func:`keep_locale`.
"""

from __future__ import annotations

import locale
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the locale of every category on the way out (usable as a decorator: ``@keep_locale()``)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)
