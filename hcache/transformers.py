"""hcache for transformers models: `capture` saves what a model processes, `restore` gives its cache back."""

from hcache.client.capture import capture
from hcache.client.restorer import restore

__all__ = ["capture", "restore"]
