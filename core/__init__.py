"""What the SDK, the server and the worker share: the job definition contract (ids, checks, commands,
units) and the plumbing of moving bytes (stream batches, chunk wire format, file writes, memory)."""
