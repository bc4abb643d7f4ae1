"""The apt backend: Debian and Ubuntu repositories (see `backend`)."""

from .backend import AptBackend

__all__ = ["AptBackend"]
