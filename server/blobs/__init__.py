"""Blob storage: the BlobStore protocol and its backends."""

from jobwire.server.blobs.base import BlobStore, BlobWriter, open_blobs

__all__ = ["BlobStore", "BlobWriter", "open_blobs"]
