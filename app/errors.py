"""The exceptions of the public API: one base class, so a caller (and the CLI) catches them once.

Every message is written for the user as is: it names the input, file or option at fault.
"""

from __future__ import annotations


class SegmentationError(Exception):
    """Base of every error ``mcp_medsam`` raises for a problem of the caller's input or install."""


class InputError(SegmentationError, ValueError):
    """A bad image, volume, box, modality or case file (one case fails; the others still run)."""


class UsageError(InputError):
    """A bad command line: options that do not fit together or do not parse (exit status 2)."""


class UnknownModality(InputError):
    """A modality string that the model's table does not accept."""


class TooLarge(InputError):
    """An input larger than a size limit (decompressed arrays, uploads); the HTTP service answers 413."""


class ModelError(SegmentationError, RuntimeError):
    """The exported model folder cannot be used (missing or malformed manifest, graphs, backend)."""


class ManifestError(ModelError):
    """``manifest.json`` is missing, malformed or points at files that are not there."""


class EngineError(ModelError):
    """The inference backend cannot load or run the folder's graphs."""
