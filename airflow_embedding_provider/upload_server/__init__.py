"""The batch side's ingest server for the client-streaming pattern (``UploadEmbeddings``, SEED.md 7.1)."""
