"""The reference API server: ``CacheService.InvalidateCache`` over an in-memory query cache."""
