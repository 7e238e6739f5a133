"""The Python AI server: loads a ``.pkl`` once and streams its rows over gRPC (docs/design.md §12)."""
