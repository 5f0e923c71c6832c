"""Blob storage: the BlobStore protocol and its backends."""

from jobwire.server.blobs.base import BlobStore, BlobWriter

__all__ = ["BlobStore", "BlobWriter"]
