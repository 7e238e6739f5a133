"""The Airflow Asset of the embedding table, which the ingest and the DLQ replay update.

Downstream DAGs (e.g. the one rebuilding recommendations) schedule on it instead of on time. Its
URI follows the Postgres provider's scheme, ``postgres://host:port/database/schema/table``, so that
Airflow normalises it the same way and OpenLineage maps it onto the same dataset as the provider's
own. The DAG files are parsed without connections, so the URI is a deployment setting,
``RECRUIT_EMBEDDING_ASSET_URI``; its default is the ``pgvector`` database of docker-compose.yaml.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import Asset

from airflow_embedding_provider.storage.schema import DEFAULT_TABLES

ASSET_URI_ENV = "RECRUIT_EMBEDDING_ASSET_URI"
DEFAULT_ASSET_URI = f"postgres://pgvector:5432/embeddings/public/{DEFAULT_TABLES.embedding}"


def embedding_table_asset(uri: str | None = None) -> Asset:
    """The Asset of the embedding table: ``uri``, else ``$RECRUIT_EMBEDDING_ASSET_URI``, else the default.

    Checked with the Postgres provider's own normalisation (port 5432 when none is given), so a
    URI it would refuse fails the DAG file's import with a message instead of later.
    """
    from airflow.providers.postgres.assets.postgres import sanitize_uri

    raw = (uri or os.environ.get(ASSET_URI_ENV) or DEFAULT_ASSET_URI).strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"{ASSET_URI_ENV} must be postgres://host:port/database/schema/table, got {raw!r}")
    try:
        normalised = sanitize_uri(parts).geturl()
    except ValueError as exc:
        raise ValueError(f"{ASSET_URI_ENV}={raw!r}: {exc} (postgres://host:port/database/schema/table)") from None
    return Asset(uri=normalised, name=DEFAULT_TABLES.embedding)


def change_extra(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The extra of an Asset event for a task's result, or ``None`` when it changed no row.

    Changed rows are the inserted, updated and (where the result counts them) deleted ones; rows
    stored again unchanged do not count, so a run that found nothing new wakes no consumer.
    """
    if not result:
        return None
    changed = sum(int(result.get(key) or 0) for key in ("inserted", "updated", "deleted"))
    if changed <= 0:
        return None
    return {"rows_changed": changed, "checkpoint": result.get("last_processed_uuid")}
