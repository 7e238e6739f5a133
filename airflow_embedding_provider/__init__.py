"""Airflow provider: embeddings from a Python AI server over gRPC streaming into PostgreSQL/pgvector."""

from __future__ import annotations

__version__ = "0.1.0"
