"""kdcache's version, its own module so that reading it imports nothing else (no torch)."""
__version__ = "0.1.0"
