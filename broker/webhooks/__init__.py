"""The webhook dispatcher: signed POSTs of results and batch ends, retried for hours, every
attempt recorded (docs/architecture.md, "Webhooks")."""
