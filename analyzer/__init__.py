"""redirect-audit: a passive analyzer for HTTP redirect chains."""

__version__ = "0.1.0"
