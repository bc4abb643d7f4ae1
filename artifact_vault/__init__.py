"""Artifact Vault: a caching reverse proxy for the Hugging Face Hub and other artifact stores."""

__version__ = "0.1.0"
