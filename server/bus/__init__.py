"""Event delivery between the parts of the server (and, later, between replicas)."""

from jobwire.server.bus.base import EventBus, Lagged, Subscription

__all__ = ["EventBus", "Lagged", "Subscription"]
