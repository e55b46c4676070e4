"""The one rich console every part of a run prints to (stderr, so that stdout stays clean for tables)."""
from rich.console import Console

console = Console(stderr=True)
