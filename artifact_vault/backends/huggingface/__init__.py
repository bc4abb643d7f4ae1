"""The Hugging Face Hub backend: `backend` (routing and flows), `hub` (the hub's language and client),
`records` (what is written down), `access` (who may read what), `prefetch` (warming a snapshot)."""

from .backend import HuggingFaceBackend

__all__ = ["HuggingFaceBackend"]
