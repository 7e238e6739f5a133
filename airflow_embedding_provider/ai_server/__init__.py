"""The Python AI server: loads a ``.pkl`` once and streams its rows over gRPC (SEED.md 12)."""
