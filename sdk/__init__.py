"""jobwire: public compute queues over gRPC."""

__version__ = "0.1.0"
