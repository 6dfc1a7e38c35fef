"""Command-line helper scripts for MiniMind-V (importable so tests can reach them)."""
