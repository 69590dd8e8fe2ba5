#!/usr/bin/env bash
# The whole pipeline on this machine: mock provider, scheduler, worker pools and accountant, a
# batch of 120 jobs of mixed priorities through RabbitMQ, then usage and cost read from Postgres.
set -euo pipefail
cd "$(dirname "$0")/../.."
. ops/scripts/common.sh
ensure_venv ""
ensure_services

export SWITCHYARD_CONFIG="${SWITCHYARD_CONFIG:-ops/config.example.yaml}"
SY="$VENV/bin/switchyard"
mkdir -p out
"$SY" migrate

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$SY" mock-provider --port 8900 --latency-ms 20 --jitter-ms 10 >out/mock-provider.log 2>&1 &
pids+=($!)
"$PY" - <<'PYEOF'
import time, httpx
for _ in range(100):
    try:
        if httpx.get("http://127.0.0.1:8900/healthz", timeout=1).status_code == 200:
            break
    except httpx.TransportError:
        time.sleep(0.2)
else:
    raise SystemExit("the mock provider did not start; see out/mock-provider.log")
PYEOF
"$SY" up >out/switchyard.log 2>&1 &
pids+=($!)

"$SY" submit ops/sample-batch.jsonl --out out/sample-batch.results.jsonl --timeout 120 --report
