"""OCI registries (Docker Hub, ghcr.io, any distribution registry): a pull-through cache of ``/v2/``."""

from .backend import OciBackend
from .router import OciRouter

__all__ = ["OciBackend", "OciRouter"]
