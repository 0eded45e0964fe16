"""hcache for transformers models: `capture` saves what a model processes, `restore` gives its cache back."""

from hcache.client.capture import CaptureStats, capture
from hcache.client.restorer import restore

__all__ = ["CaptureStats", "capture", "restore"]
