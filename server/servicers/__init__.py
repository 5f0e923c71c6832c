"""gRPC servicers: thin adapters from requests to the domain objects."""
