"""The batch side's ingest server for the client-streaming pattern (``UploadEmbeddings``, docs/design.md §7.1)."""
