"""hcache for transformers models: capture saves what a model processes, restore gives its cache back, lookup counts
what is held."""

from hcache.client.capture import CaptureStats, capture
from hcache.client.restorer import lookup, restore

__all__ = ["CaptureStats", "capture", "lookup", "restore"]
