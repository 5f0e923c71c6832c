"""Event delivery between the parts of the server and between replicas."""

from jobwire.server.bus.base import EventBus, Lagged, Subscription, open_bus

__all__ = ["EventBus", "Lagged", "Subscription", "open_bus"]
