"""Job state: the StateStore protocol and its backends."""

from jobwire.server.store.base import StateStore, open_store

__all__ = ["StateStore", "open_store"]
