"""I/O edge: ingest, pipeline, API, CLI."""
