# Shared by demo.sh, test.sh and .ci/run: a virtual environment, and the three services up.
# Source it from the repository root.

VENV="${SWITCHYARD_VENV:-.venv}"
PY="$VENV/bin/python"

ensure_venv() {
  # $1: pip extras, e.g. "[dev]"
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV" || { echo "cannot create a virtual environment: install python3-venv (Python >= 3.11)" >&2; exit 2; }
  fi
  mkdir -p out
  # requirements.lock (ops/scripts/lock.sh) pins every package to the version CI tested.
  "$PY" -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".$1" \
    >out/pip.log 2>&1 \
    || { cat out/pip.log >&2; echo "pip install failed (log above)" >&2; exit 2; }
}

# host and port out of a URL such as amqp://guest:guest@127.0.0.1:5672/ (default port $2).
_host_port() {
  "$PY" - "$1" "$2" <<'PYEOF'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1].replace("postgresql+asyncpg", "postgresql"))
print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
PYEOF
}

_answers() {  # host port
  "$PY" -c "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()" "$1" "$2" 2>/dev/null
}

_wait_for() {  # name host port seconds
  local i
  for ((i = 0; i < $4 * 2; i++)); do
    _answers "$2" "$3" && return 0
    sleep 0.5
  done
  echo "$1 did not come up at $2:$3 within $4 s" >&2
  return 1
}

# Start a local service the way this machine's packages do (see the env page), if installed.
_start_local() {
  case "$1" in
    rabbitmq) command -v rabbitmq-server >/dev/null && rabbitmq-server -detached ;;
    postgres) command -v pg_ctlcluster >/dev/null \
                && pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start ;;
    redis)    command -v redis-server >/dev/null \
                && redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no ;;
  esac
}

ensure_services() {
  local amqp db redis name url default hp host port missing=()
  amqp="${SWITCHYARD_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
  db="${SWITCHYARD_DATABASE_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/postgres}"
  redis="${SWITCHYARD_REDIS_URL:-redis://127.0.0.1:6379/0}"
  for spec in "rabbitmq|$amqp|5672" "postgres|$db|5432" "redis|$redis|6379"; do
    IFS='|' read -r name url default <<<"$spec"
    hp=$(_host_port "$url" "$default"); host=${hp% *}; port=${hp#* }
    _answers "$host" "$port" && continue
    if docker info >/dev/null 2>&1; then
      echo "$name is down at $host:$port; starting it with docker compose" >&2
      docker compose up -d --wait "$name" && continue
    elif [ "$host" = 127.0.0.1 ] || [ "$host" = localhost ]; then
      echo "$name is down at $host:$port; starting the local server" >&2
      _start_local "$name" >/dev/null 2>&1
      _wait_for "$name" "$host" "$port" 60 && continue
    fi
    missing+=("$name at $host:$port")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    cat >&2 <<MSG
Switchyard needs RabbitMQ (3.10+), PostgreSQL (13+) and Redis (6+). Not reachable: ${missing[*]}.
Either start them (a Docker engine: 'docker compose up -d rabbitmq postgres redis'; Debian:
'apt-get install rabbitmq-server postgresql redis-server'), or point SWITCHYARD_AMQP_URL,
SWITCHYARD_DATABASE_URL and SWITCHYARD_REDIS_URL at servers that run.
MSG
    exit 2
  fi
}

# Debian packages the tests use: Prometheus and promtool (the metrics, dashboards and alert
# rules are checked against a real one), pdftoppm (the usage report's PDF is rendered to PNG).
TEST_DEBS="prometheus poppler-utils"

ensure_debs() {  # package...
  local p missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "install these Debian packages: ${missing[*]}" >&2; exit 2; }
  mkdir -p out
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"; } >out/apt.log 2>&1 \
    || { cat out/apt.log >&2; echo "apt-get install ${missing[*]} failed (log above)" >&2; exit 2; }
}

# RabbitMQ's management API (queue depth and the oldest message's age, read by the scheduler's
# queue gauges) and its own Prometheus endpoint, on a local RabbitMQ; enabling is idempotent.
ensure_rabbitmq_plugins() {
  command -v rabbitmq-plugins >/dev/null || return 0
  rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_management \
    && rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_prometheus && return 0
  rabbitmq-plugins enable --quiet rabbitmq_management rabbitmq_prometheus >out/rabbitmq-plugins.log 2>&1 \
    || { cat out/rabbitmq-plugins.log >&2; echo "could not enable RabbitMQ's management plugin" >&2; exit 2; }
}
