"""Runnable examples of hcache with real models (`make demo`)."""
