"""Loft's command-line client (``loft``), standard library only: see ``loft_cli.main``."""

__version__ = "0.1.0"
