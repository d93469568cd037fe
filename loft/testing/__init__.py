"""Test support shipped with Loft: the pytest plugin that starts the embedded stack."""
