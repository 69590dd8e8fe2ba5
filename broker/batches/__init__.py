"""Stored batches in the OpenAI Batch API's shape: files, validation, the runner that enqueues their lines and collects their answers (docs/architecture.md, "Batches")."""
