"""The storage layer: the schema, the chunk writer (metadata, embedding, DLQ, checkpoint)."""
