#!/usr/bin/env bash
# Local Apache Kafka 4.x broker from Maven Central jars (no Docker): single node, KRaft combined
# mode, PLAINTEXT on 127.0.0.1 only. Everything it writes lives under <project>/var/kafka/.
#
#   deploy/kafka/kafka.sh fetch    download the broker jars into var/kafka/libs (once per pom.xml)
#   deploy/kafka/kafka.sh up       start the broker (or reuse one already answering) and wait
#                                  until it serves metadata; formats var/kafka/data on first use
#   deploy/kafka/kafka.sh down     stop the broker started by `up` (SIGTERM, then SIGKILL)
#   deploy/kafka/kafka.sh status   print whether it runs (exit 0 running, 3 not running)
#   deploy/kafka/kafka.sh reset    down, then delete var/kafka/data (keeps the jars)
#
# Environment:
#   KAFKA_PORT (9092)  KAFKA_CONTROLLER_PORT (9093)  KAFKA_HEAP ("-Xms256m -Xmx768m")
#   KAFKA_STATE_DIR (var/kafka: data, logs, config and pid of this broker; the jars stay in
#   var/kafka/libs, so a second broker, e.g. one a test restarts, shares them)
#   KAFKA_OPTS (extra JVM options)  KAFKA_START_TIMEOUT (120 s)  KAFKA_STOP_TIMEOUT (30 s)
#   MVN (mvn)  JAVA_HOME
# Needs Java 17+, and Maven with access to Maven Central for `fetch`.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"

HOST=127.0.0.1
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP="${KAFKA_HEAP:--Xms256m -Xmx768m}"
KAFKA_OPTS="${KAFKA_OPTS:-}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
MVN="${MVN:-mvn}"
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi

POM="$SCRIPT_DIR/pom.xml"
TEMPLATE="$SCRIPT_DIR/server.properties"
LOG4J="$SCRIPT_DIR/log4j2.properties"
VAR="${KAFKA_STATE_DIR:-$ROOT/var/kafka}"
LIBS="$ROOT/var/kafka/libs"
STAMP="$LIBS/.pom.sha256"
DATA="$VAR/data"
LOGS="$VAR/logs"
CONFIG="$VAR/server.properties"
PID_FILE="$VAR/kafka.pid"
VENV_PY="$ROOT/.venv/bin/python"
BOOTSTRAP="$HOST:$KAFKA_PORT"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# jars

pom_sum() { sha256sum "$POM" | cut -d' ' -f1; }

libs_ok() {
  [[ -f "$STAMP" && "$(<"$STAMP")" == "$(pom_sum)" ]] \
    && compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null
}

kafka_version() {
  local jar
  jar="$(compgen -G "$LIBS/kafka_2.13-*.jar" | head -n1)" || return 0
  jar="${jar##*/kafka_2.13-}"
  printf '%s' "${jar%.jar}"
}

cmd_fetch() {
  if libs_ok; then
    log "jars for this pom.xml already in $LIBS"
    return 0
  fi
  command -v "$MVN" >/dev/null || die "Maven ('$MVN') not found; it is needed once to fetch the jars"
  local sum tmp start=$SECONDS
  sum="$(pom_sum)"
  tmp="$LIBS.tmp.$$"
  mkdir -p "$VAR" "$LOGS" "$(dirname "$LIBS")"
  rm -rf "$tmp"
  log "fetching the broker jars from Maven Central into $LIBS ..."
  # Output goes to a file: Debian's Maven 3.8 prints stray ANSI resets even with -B -q.
  if ! "$MVN" -q -B -f "$POM" \
      org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$LOGS/fetch.out" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$LOGS/fetch.out" >&2
    die "Maven could not fetch the jars (full output: $LOGS/fetch.out)"
  fi
  compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || { rm -rf "$tmp"; die "no kafka_2.13 jar fetched"; }
  printf '%s\n' "$sum" >"$tmp/.pom.sha256"
  # Swap the whole directory so jars of an older pom never mix with the new ones.
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars (Kafka $(kafka_version)) in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------------------------------------
# processes and probes

# Prints the pid from the pid file if that process is alive and is our kafka.Kafka.
running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(<"$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] && is_broker_pid "$pid" || return 1
  printf '%s\n' "$pid"
}

# True while $1 is a live (not zombie) kafka.Kafka process.
is_broker_pid() {
  local cmdline
  cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline")" || return 1
  [[ "$cmdline" == *" kafka.Kafka "* ]]
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

have_py_probe() {
  if [[ -z "${_HAVE_PY_PROBE:-}" ]]; then
    if [[ -x "$VENV_PY" ]] && "$VENV_PY" -c 'import aiokafka' >/dev/null 2>&1; then
      _HAVE_PY_PROBE=yes
    else
      _HAVE_PY_PROBE=no
    fi
  fi
  [[ "$_HAVE_PY_PROBE" == yes ]]
}

# A real Kafka round trip (ApiVersions + Metadata) with aiokafka from the project's venv.
kafka_answers() {
  "$VENV_PY" - "$BOOTSTRAP" >/dev/null 2>&1 <<'PY'
import asyncio
import logging
import sys

from aiokafka.admin import AIOKafkaAdminClient


async def main(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        if not cluster.get("brokers"):
            raise RuntimeError("no brokers in metadata")
        await admin.list_topics()
    finally:
        await admin.close()


logging.disable(logging.CRITICAL)
try:
    asyncio.run(asyncio.wait_for(main(sys.argv[1]), 10))
except BaseException:
    sys.exit(1)
PY
}

# ---------------------------------------------------------------------------------------------
# config, storage, start

render_config() {
  mkdir -p "$VAR" "$DATA" "$LOGS"
  {
    printf '# Generated by deploy/kafka/kafka.sh from deploy/kafka/server.properties; do not edit.\n'
    grep -Ev '^[[:space:]]*(listeners|advertised\.listeners|controller\.quorum\.voters|controller\.quorum\.bootstrap\.servers|log\.dirs)[[:space:]]*[=:]' "$TEMPLATE"
    printf '\n# --- set by kafka.sh ---\n'
    printf 'listeners=PLAINTEXT://%s:%s,CONTROLLER://%s:%s\n' \
      "$HOST" "$KAFKA_PORT" "$HOST" "$KAFKA_CONTROLLER_PORT"
    printf 'advertised.listeners=PLAINTEXT://%s:%s,CONTROLLER://%s:%s\n' \
      "$HOST" "$KAFKA_PORT" "$HOST" "$KAFKA_CONTROLLER_PORT"
    printf 'controller.quorum.voters=1@%s:%s\n' "$HOST" "$KAFKA_CONTROLLER_PORT"
    printf 'log.dirs=%s\n' "$DATA"
  } >"$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
}

new_cluster_id() {
  local py
  for py in "$VENV_PY" python3; do
    if command -v "$py" >/dev/null 2>&1; then
      # Kafka's Uuid text: 22 chars of url-safe base64; never starting with '-' (like Kafka's own).
      "$py" -c 'import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not s.startswith("-"):
        print(s)
        break' && return 0
    fi
  done
  "$JAVA" -cp "$LIBS/*" kafka.tools.StorageTool random-uuid
}

format_storage() {
  [[ -f "$DATA/meta.properties" ]] && return 0
  local cid
  cid="$(new_cluster_id)"
  log "formatting $DATA (cluster id $cid)"
  "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$LOGS" \
    -cp "$LIBS/*" kafka.tools.StorageTool format -t "$cid" -c "$CONFIG" >>"$LOGS/format.out" 2>&1 \
    || { tail -n 20 "$LOGS/format.out" >&2; die "kafka-storage format failed"; }
}

show_logs() {
  local f
  for f in "$LOGS/kafka.out" "$LOGS/server.log"; do
    [[ -s "$f" ]] || continue
    printf -- '--- last lines of %s ---\n' "$f" >&2
    tail -n 40 "$f" >&2
  done
}

# Starts kafka.Kafka in the background; sets BROKER_PID.
start_broker() {
  command -v "$JAVA" >/dev/null || die "java not found (Kafka 4.x needs Java 17+)"
  local heap opts extra
  read -r -a heap <<<"$KAFKA_HEAP"
  read -r -a extra <<<"$KAFKA_OPTS"
  opts=(
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$LOGS"
  )
  printf '\n=== %s kafka.sh up: starting broker on %s ===\n' "$(date -Is)" "$BOOTSTRAP" \
    >>"$LOGS/kafka.out"
  # New session (setsid) + nohup: the broker outlives this script and the test run that called
  # it. fd 9 (the kafka.sh lock) must not leak into the JVM.
  setsid nohup "$JAVA" "${heap[@]}" "${opts[@]}" "${extra[@]}" -cp "$LIBS/*" \
    kafka.Kafka "$CONFIG" </dev/null >>"$LOGS/kafka.out" 2>&1 9>&- &
  BROKER_PID=$!
  printf '%s\n' "$BROKER_PID" >"$PID_FILE"
}

# Waits until the broker $1 serves clients: port open AND a metadata round trip (aiokafka from the
# project venv), or, without that venv, port open AND "Kafka Server started" in the log since
# byte offset $2 of server.log.
wait_ready() {
  local pid="$1" log_offset="${2:-0}" deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while :; do
    if ! is_broker_pid "$pid"; then
      rm -f "$PID_FILE"
      show_logs
      die "the broker process (pid $pid) exited during startup"
    fi
    if port_open "$KAFKA_PORT"; then
      if have_py_probe; then
        kafka_answers && return 0
      elif grep -q 'Kafka Server started' \
          < <(tail -c "+$((log_offset + 1))" "$LOGS/server.log" 2>/dev/null); then
        return 0
      fi
    fi
    if ((SECONDS >= deadline)); then
      show_logs
      stop_pid "$pid"
      die "the broker did not accept clients on $BOOTSTRAP within ${KAFKA_START_TIMEOUT} s; stopped it"
    fi
    sleep 0.5
  done
}

stop_pid() {
  local pid="$1" deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
  kill -TERM "$pid" 2>/dev/null || true
  while is_broker_pid "$pid"; do
    if ((SECONDS >= deadline)); then
      log "broker (pid $pid) still running after ${KAFKA_STOP_TIMEOUT} s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.5
  done
  rm -f "$PID_FILE"
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_up() {
  local pid start=$SECONDS
  if pid="$(running_pid)"; then
    log "broker already started by kafka.sh (pid $pid); checking that it serves clients"
    wait_ready "$pid"
    log "Kafka ready on $BOOTSTRAP (pid $pid)"
    return 0
  fi
  rm -f "$PID_FILE"
  if port_open "$KAFKA_PORT"; then
    if ! have_py_probe || kafka_answers; then
      log "reusing the Kafka broker already listening on $BOOTSTRAP"
      return 0
    fi
    die "$BOOTSTRAP is in use by something that does not answer as a Kafka broker"
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "controller port $HOST:$KAFKA_CONTROLLER_PORT is already in use (set KAFKA_CONTROLLER_PORT)"
  fi

  cmd_fetch
  render_config
  format_storage
  local log_offset=0
  [[ -f "$LOGS/server.log" ]] && log_offset="$(stat -c %s "$LOGS/server.log")"
  start_broker
  pid="$BROKER_PID"
  log "started Kafka $(kafka_version) (pid $pid); waiting up to ${KAFKA_START_TIMEOUT} s"
  wait_ready "$pid" "$log_offset"
  log "Kafka $(kafka_version) ready on $BOOTSTRAP (pid $pid) after $((SECONDS - start)) s"
}

cmd_down() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    if port_open "$KAFKA_PORT"; then
      log "no broker started by kafka.sh runs; $BOOTSTRAP is served by something else (left alone)"
    else
      log "not running"
    fi
    return 0
  fi
  log "stopping broker (pid $pid)"
  stop_pid "$pid"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    if port_open "$KAFKA_PORT"; then
      echo "running: Kafka $(kafka_version), pid $pid, bootstrap $BOOTSTRAP"
    else
      echo "starting (or unhealthy): pid $pid, $BOOTSTRAP not open yet"
    fi
    return 0
  fi
  if port_open "$KAFKA_PORT"; then
    echo "port open: $BOOTSTRAP is served by a process not started by kafka.sh"
    return 0
  fi
  echo "not running"
  return 3
}

cmd_reset() {
  cmd_down
  rm -rf "$DATA" "$CONFIG"
  log "deleted $DATA"
}

with_lock() {
  mkdir -p "$VAR"
  exec 9>"$VAR/.lock"
  flock -w 900 9 || die "another kafka.sh holds $VAR/.lock"
  "$@"
}

case "${1:-}" in
  fetch) with_lock cmd_fetch ;;
  up) with_lock cmd_up ;;
  down) with_lock cmd_down ;;
  reset) with_lock cmd_reset ;;
  status) cmd_status ;;
  *)
    echo "usage: ${0##*/} fetch|up|down|status|reset" >&2
    exit 2
    ;;
esac
