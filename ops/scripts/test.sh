#!/usr/bin/env bash
# The test suite against the RabbitMQ, Postgres and Redis at the configured URLs (each test session
# uses its own queue namespace and a fresh database, and removes them afterwards).
set -euo pipefail
cd "$(dirname "$0")/../.."
. ops/scripts/common.sh
ensure_venv "[dev]"
ensure_services
ensure_rabbitmq_plugins
ensure_debs $TEST_DEBS
exec "$VENV/bin/pytest" "$@"
