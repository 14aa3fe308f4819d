"""ztgpu-collectord: central audit collector (ingest, chain checks, storage, query API)."""
