"""hcache: restore an LLM's KV cache fast from saved hidden states (HCache, EuroSys '25)."""

__version__ = "0.1.0"
