"""Stored batches in the OpenAI Batch API's shape: files (``files.py``), the input's lines and the
output's (``lines.py``), their rows (``store.py``), the runner that validates, enqueues and
collects them (``runner.py``), and the HTTP routes (``api.py``). A batch line is a chat
completions request, so batches live with the gateway; the runner runs in the gateway process."""
