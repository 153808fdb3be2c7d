"""The hub's HTTP service: the operator API under /api/v1 and the TUF repository under /tuf."""

from hub.api.app import create_app

__all__ = ["create_app"]
