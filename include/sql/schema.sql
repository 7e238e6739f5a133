-- The storage schema (docs/design.md §4.2-4.4, 8), applied idempotently by the provider before each run.
-- Placeholders in braces are filled with psycopg.sql: identifiers quoted, the dimension a literal.
-- Columns beyond the design's are additive and nullable or defaulted, so the design's own tables
-- are upgraded in place.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS {metadata} (
    id UUID PRIMARY KEY,
    company_name TEXT,
    exp_years INT,
    english_level TEXT,
    primary_keyword TEXT,
    updated_at TIMESTAMP DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS {embedding} (
    id UUID PRIMARY KEY REFERENCES {metadata}(id) ON DELETE CASCADE,
    vector VECTOR({dimension}),
    updated_at TIMESTAMP DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS {dlq} (
    id UUID,
    error_message TEXT,
    payload JSONB,
    created_at TIMESTAMP DEFAULT NOW()
);
-- error_kind: a short reason (dimension_mismatch, invalid_id, ...) to scope replays by.
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS error_kind TEXT;
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS dlq_id BIGSERIAL;
-- row_key: sha256 of the row as received, so that the same bad row sent again is one entry.
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS row_key TEXT;
-- status: pending until a replay stores the row (resolved); attempts counts replays tried.
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS status TEXT NOT NULL DEFAULT 'pending';
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS attempts INT NOT NULL DEFAULT 0;
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS last_attempt_at TIMESTAMP;
CREATE INDEX IF NOT EXISTS {dlq_id_index} ON {dlq} (id);
CREATE UNIQUE INDEX IF NOT EXISTS {dlq_row_key_index} ON {dlq} (row_key);

CREATE TABLE IF NOT EXISTS {checkpoint} (
    id SERIAL PRIMARY KEY,
    last_processed_uuid UUID,
    updated_at TIMESTAMP DEFAULT NOW()
);
-- One row a stream, updated in place and never moved backwards (storage/checkpoint.py: advance_checkpoint).
ALTER TABLE {checkpoint} ADD COLUMN IF NOT EXISTS stream_name TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS {checkpoint_stream_index} ON {checkpoint} (stream_name);

-- Cache invalidation outbox (docs/design.md §7.4, 10.1-10.2): a writer that changed rows records, in the
-- same transaction, that the API server's cache for target must be dropped. One pending entry per
-- (target, source); a deliverer coalesces every pending entry of a target into one call.
CREATE TABLE IF NOT EXISTS {outbox} (
    id BIGSERIAL PRIMARY KEY,
    target TEXT NOT NULL,
    source TEXT NOT NULL,
    requested_at TIMESTAMP NOT NULL DEFAULT NOW(),
    delivered_at TIMESTAMP,
    attempts INT NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS {outbox_pending_index} ON {outbox} (target, source) WHERE delivered_at IS NULL;
-- version: bumped by every change that re-requests a pending entry, so that a deliverer marks it
-- delivered only when no change arrived after it read the entry (storage/outbox.py: deliver).
ALTER TABLE {outbox} ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 0;

-- Progress of each partition of a mapped ingest run: a retried task resumes after committed_uuid;
-- the stream's checkpoint is the low watermark over a run's partitions (storage/checkpoint.py).
CREATE TABLE IF NOT EXISTS {progress} (
    stream_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    partition_index INT NOT NULL,
    after_uuid UUID,
    until_uuid UUID,
    rows_planned BIGINT NOT NULL,
    committed_uuid UUID,
    done BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at TIMESTAMP NOT NULL DEFAULT NOW(),
    PRIMARY KEY (stream_name, run_id, partition_index)
);

-- The search setting the recall gate chose after the last load that built or changed the ANN index
-- (storage/recall.py): one row per embedding table; every search of the provider applies it
-- (storage/search.py). Users' own SQL gets it from ALTER DATABASE ... SET where allowed (README "Search").
CREATE TABLE IF NOT EXISTS {search_settings} (
    embedding_table TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    setting TEXT NOT NULL,
    value INT NOT NULL,
    recall_at_10 DOUBLE PRECISION NOT NULL,
    min_recall DOUBLE PRECISION NOT NULL,
    rows_indexed BIGINT NOT NULL,
    measured_at TIMESTAMP NOT NULL DEFAULT NOW()
);
-- Range sync (airflow_embedding_provider/digest.py, storage/sync.py): each row's content hash,
-- written with the row, so that a range's digest is one sum over stored rows. NULL = written
-- before this column existed: such a range differs once and is re-sent, which fills it in.
ALTER TABLE {metadata} ADD COLUMN IF NOT EXISTS row_hash BIGINT;
-- The hash of a dead-lettered row as received: a pending entry counts as the source's row, so an
-- unchanged bad row does not make its range differ on every run.
ALTER TABLE {dlq} ADD COLUMN IF NOT EXISTS row_hash BIGINT;
-- How a partition syncs (storage/sync.py: SyncMode) and how many rows it may delete.
ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS sync_mode TEXT;
ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS max_deletes BIGINT NOT NULL DEFAULT 0;
-- Rows the partition's sync deleted, recorded in the deleting transaction: a try whose result
-- was lost (killed after it committed) still counts in the run's total.
ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS deleted BIGINT NOT NULL DEFAULT 0;
