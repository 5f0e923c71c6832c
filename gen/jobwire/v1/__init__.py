"""Generated from proto/jobwire/v1 by `make gen`; never edit by hand."""
