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
#
# Secure mode (opt-in, KAFKA_SECURE=1): two more listeners beside PLAINTEXT (which stays on
# 127.0.0.1 for the controller, the broker's own traffic and local admin):
#   SASL_SSL on 127.0.0.1:$KAFKA_SASL_SSL_PORT (9094): TLS, then SCRAM-SHA-512
#   MTLS     on localhost:$KAFKA_MTLS_PORT (9095):     TLS with ssl.client.auth=required
# On first use it makes, under $KAFKA_STATE_DIR (mode 700, keys and passwords mode 600):
#   tls/ca.crt, ca.key            a CA of this broker's own (clients trust ca.crt)
#   tls/broker.pem                the broker's key and certificate (SANs DNS:localhost,
#                                 IP:127.0.0.1), a PEM keystore
#   tls/client.crt, client.key    a client certificate for MTLS; client.key is encrypted
#   tls/client.key.password       (PKCS#8, AES-256) with the password in this file
#   scram/<user>.password         a random password per SCRAM-SHA-512 user
#                                 (KAFKA_SCRAM_USERS, "voucher-bridge admin")
# SCRAM users are written when the storage is formatted: a data directory formatted without
# them (an earlier plaintext start) is refused; `KAFKA_SECURE=1 kafka.sh reset` formats anew.
# No password is ever printed.
# Needs Java 17+, and Maven with access to Maven Central for `fetch`; openssl for secure mode.
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

KAFKA_SECURE="${KAFKA_SECURE:-0}"
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-9094}"
KAFKA_MTLS_PORT="${KAFKA_MTLS_PORT:-9095}"
KAFKA_SCRAM_USERS="${KAFKA_SCRAM_USERS:-voucher-bridge admin}"
TLS="$VAR/tls"
SCRAM="$VAR/scram"
# Written once storage is formatted with the SCRAM users (they live in the metadata log).
SCRAM_STAMP="$VAR/.scram-formatted"
# The MTLS listener is advertised by name: clients connecting to it check the DNS SAN, those
# on SASL_SSL the IP SAN.
MTLS_HOST=localhost
# A secure broker's files (keys, passwords, the metadata log and format output holding the
# users' SCRAM keys) are for this account only.
if [[ "$KAFKA_SECURE" == 1 ]]; then umask 077; fi

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

# True without secure mode; with it, while both secure listeners accept connections.
secure_ports_open() {
  ! secure || { port_open "$KAFKA_SASL_SSL_PORT" && port_open "$KAFKA_MTLS_PORT"; }
}

secure_summary() {
  printf 'SASL_SSL (SCRAM-SHA-512) on %s:%s, MTLS on %s:%s, CA %s' "$HOST" "$KAFKA_SASL_SSL_PORT" \
    "$MTLS_HOST" "$KAFKA_MTLS_PORT" "$TLS/ca.crt"
}

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
  local replaced='listeners|advertised\.listeners|controller\.quorum\.voters|controller\.quorum\.bootstrap\.servers|log\.dirs'
  local listeners advertised
  listeners="$(printf 'PLAINTEXT://%s:%s,CONTROLLER://%s:%s' \
    "$HOST" "$KAFKA_PORT" "$HOST" "$KAFKA_CONTROLLER_PORT")"
  advertised="$listeners"
  if secure; then
    replaced+='|listener\.security\.protocol\.map'
    listeners+="$(printf ',SASL_SSL://%s:%s,MTLS://%s:%s' \
      "$HOST" "$KAFKA_SASL_SSL_PORT" "$HOST" "$KAFKA_MTLS_PORT")"
    advertised+="$(printf ',SASL_SSL://%s:%s,MTLS://%s:%s' \
      "$HOST" "$KAFKA_SASL_SSL_PORT" "$MTLS_HOST" "$KAFKA_MTLS_PORT")"
  fi
  {
    printf '# Generated by deploy/kafka/kafka.sh from deploy/kafka/server.properties; do not edit.\n'
    grep -Ev "^[[:space:]]*($replaced)[[:space:]]*[=:]" "$TEMPLATE"
    printf '\n# --- set by kafka.sh ---\n'
    printf 'listeners=%s\n' "$listeners"
    printf 'advertised.listeners=%s\n' "$advertised"
    printf 'controller.quorum.voters=1@%s:%s\n' "$HOST" "$KAFKA_CONTROLLER_PORT"
    printf 'log.dirs=%s\n' "$DATA"
    if secure; then secure_config; fi
  } >"$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
}

# ---------------------------------------------------------------------------------------------
# secure mode: TLS material, SCRAM users, the listeners' settings

secure() { [[ "$KAFKA_SECURE" == 1 ]]; }

# Listener settings (KAFKA_SECURE=1). No secret in them: the broker's key is not encrypted
# (it is mode 600 in a mode 700 directory), and SCRAM needs no JAAS credentials on a broker
# whose own traffic stays on PLAINTEXT.
secure_config() {
  cat <<EOF

# --- secure listeners (KAFKA_SECURE=1) ---
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL
ssl.keystore.type=PEM
ssl.keystore.location=$TLS/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.crt
ssl.enabled.protocols=TLSv1.3,TLSv1.2
listener.name.mtls.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

check_secure_env() {
  local port user
  for port in "$KAFKA_SASL_SSL_PORT" "$KAFKA_MTLS_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || die "KAFKA_SASL_SSL_PORT and KAFKA_MTLS_PORT must be port numbers"
  done
  [[ -n "${KAFKA_SCRAM_USERS// /}" ]] || die "KAFKA_SCRAM_USERS names no user"
  for user in $KAFKA_SCRAM_USERS; do
    # Goes into kafka-storage's SCRAM argument ("[name=...,password=...]") as it is.
    [[ "$user" =~ ^[A-Za-z0-9._-]+$ ]] || die "SCRAM user name '$user': letters, digits, . _ - only"
  done
  command -v openssl >/dev/null || die "openssl not found (needed for KAFKA_SECURE=1)"
}

TLS_FILES=(ca.crt ca.key broker.pem client.crt client.key client.key.password)

tls_complete() {
  local f
  for f in "${TLS_FILES[@]}"; do [[ -s "$TLS/$f" ]] || return 1; done
}

# One certificate signed by the CA in $1: name $2, subject CN $3, extensions $4 (openssl
# x509v3 config lines). Leaves $1/$2.key (PKCS#8, unencrypted) and $1/$2.crt.
sign_cert() {
  local dir="$1" name="$2" cn="$3" ext="$4"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$cn" || return 1
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 \
    -extfile <(printf '%s\n' "$ext") -out "$dir/$name.crt" || return 1
  rm -f "$dir/$name.csr"
}

# Everything in tls/, into the directory $1 (openssl's output on stderr; no secret in it).
make_tls_files() {
  local dir="$1" leaf='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid'
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 -sha256 \
    -subj "/CN=voucher-bridge local Kafka CA $(openssl rand -hex 4)" \
    -addext 'basicConstraints=critical,CA:TRUE,pathlen:0' \
    -addext 'keyUsage=critical,keyCertSign,cRLSign' || return 1
  sign_cert "$dir" broker localhost "$leaf
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1" || return 1
  cat "$dir/broker.key" "$dir/broker.crt" "$dir/ca.crt" >"$dir/broker.pem" || return 1
  rm -f "$dir/broker.key"
  sign_cert "$dir" client voucher-bridge "$leaf
extendedKeyUsage=clientAuth" || return 1
  # The client's key encrypted (PKCS#8, PBES2 with AES-256): what KAFKA_SSL_KEY_PASSWORD opens.
  openssl rand -hex 24 >"$dir/client.key.password" || return 1
  openssl pkcs8 -topk8 -v2 aes-256-cbc -in "$dir/client.key" -out "$dir/client.key.enc" \
    -passout "file:$dir/client.key.password" || return 1
  mv "$dir/client.key.enc" "$dir/client.key"
  # Public: clients read them.
  chmod 644 "$dir/ca.crt" "$dir/broker.crt" "$dir/client.crt"
}

# The CA, the broker's keystore and the MTLS client's certificate, made once (all or nothing:
# built in a temporary directory, then moved into place).
ensure_tls() {
  if [[ -d "$TLS" ]]; then
    tls_complete || die "$TLS is incomplete (remove it to make new certificates)"
    return 0
  fi
  local tmp="$TLS.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$LOGS"
  if ! (umask 077 && mkdir -p "$tmp" && make_tls_files "$tmp") >>"$LOGS/tls.out" 2>&1; then
    rm -rf "$tmp"
    tail -n 20 "$LOGS/tls.out" >&2
    die "openssl could not make the TLS files (full output: $LOGS/tls.out)"
  fi
  chmod 700 "$tmp"
  mv "$tmp" "$TLS"
  log "made a CA, the broker's certificate and an MTLS client certificate in $TLS"
}

# A random password per SCRAM user, in a file only this account can read.
ensure_scram_passwords() {
  local user
  (umask 077 && mkdir -p "$SCRAM")
  chmod 700 "$SCRAM"
  for user in $KAFKA_SCRAM_USERS; do
    [[ -s "$SCRAM/$user.password" ]] && continue
    (umask 077 && openssl rand -hex 24 >"$SCRAM/$user.password.tmp") \
      && mv "$SCRAM/$user.password.tmp" "$SCRAM/$user.password" \
      || die "could not write $SCRAM/$user.password"
  done
}

# kafka-storage's --add-scram arguments, one per user, into SCRAM_ARGS. They hold the
# passwords: never logged. (They are on kafka-storage's command line for the seconds it
# runs; the format has no other way in, and this is a loopback broker for development.)
scram_args() {
  local user
  SCRAM_ARGS=()
  for user in $KAFKA_SCRAM_USERS; do
    SCRAM_ARGS+=(--add-scram "SCRAM-SHA-512=[name=$user,password=$(<"$SCRAM/$user.password")]")
  done
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
  if [[ -f "$DATA/meta.properties" ]]; then
    if secure && [[ ! -f "$SCRAM_STAMP" ]]; then
      die "$DATA was formatted without SCRAM users (a plaintext start?); to start it secure: KAFKA_SECURE=1 $0 reset"
    fi
    return 0
  fi
  local cid
  cid="$(new_cluster_id)"
  SCRAM_ARGS=()
  if secure; then scram_args; fi
  log "formatting $DATA (cluster id $cid)"
  "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$LOGS" \
    -cp "$LIBS/*" kafka.tools.StorageTool format -t "$cid" -c "$CONFIG" "${SCRAM_ARGS[@]}" \
    >>"$LOGS/format.out" 2>&1 \
    || { tail -n 20 "$LOGS/format.out" >&2; die "kafka-storage format failed"; }
  if secure; then
    : >"$SCRAM_STAMP"
    log "SCRAM-SHA-512 users ${KAFKA_SCRAM_USERS// /, } (passwords in $SCRAM/<user>.password)"
  fi
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
    # Checked twice, a second apart: once, on a fresh machine's first start, the check failed
    # while the broker went on to serve (the cause was not found; a second look costs nothing).
    if ! is_broker_pid "$pid" && ! { sleep 1 && is_broker_pid "$pid"; }; then
      rm -f "$PID_FILE"
      show_logs
      die "the broker process (pid $pid) exited during startup"
    fi
    if port_open "$KAFKA_PORT" && secure_ports_open; then
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
  if secure; then check_secure_env; fi
  if pid="$(running_pid)"; then
    log "broker already started by kafka.sh (pid $pid); checking that it serves clients"
    wait_ready "$pid"
    log "Kafka ready on $BOOTSTRAP (pid $pid)"
    if secure; then log "$(secure_summary)"; fi
    return 0
  fi
  rm -f "$PID_FILE"
  if port_open "$KAFKA_PORT"; then
    if ! have_py_probe || kafka_answers; then
      secure_ports_open \
        || die "the broker on $BOOTSTRAP (not started by kafka.sh) has no secure listeners on $HOST:$KAFKA_SASL_SSL_PORT and $HOST:$KAFKA_MTLS_PORT"
      log "reusing the Kafka broker already listening on $BOOTSTRAP"
      return 0
    fi
    die "$BOOTSTRAP is in use by something that does not answer as a Kafka broker"
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "controller port $HOST:$KAFKA_CONTROLLER_PORT is already in use (set KAFKA_CONTROLLER_PORT)"
  fi
  if secure; then
    local port
    for port in "$KAFKA_SASL_SSL_PORT" "$KAFKA_MTLS_PORT"; do
      port_open "$port" \
        && die "port $HOST:$port is already in use (set KAFKA_SASL_SSL_PORT / KAFKA_MTLS_PORT)"
    done
  fi

  cmd_fetch
  if secure; then
    # The metadata log and format.out hold the users' SCRAM keys: this account's only, even
    # where an earlier plaintext start made these directories.
    mkdir -p "$DATA" "$LOGS"
    chmod 700 "$DATA" "$LOGS"
    ensure_tls
    ensure_scram_passwords
  fi
  render_config
  format_storage
  local log_offset=0
  [[ -f "$LOGS/server.log" ]] && log_offset="$(stat -c %s "$LOGS/server.log")"
  start_broker
  pid="$BROKER_PID"
  log "started Kafka $(kafka_version) (pid $pid); waiting up to ${KAFKA_START_TIMEOUT} s"
  wait_ready "$pid" "$log_offset"
  log "Kafka $(kafka_version) ready on $BOOTSTRAP (pid $pid) after $((SECONDS - start)) s"
  if secure; then log "$(secure_summary)"; fi
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
      if secure; then echo "$(secure_summary)"; fi
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
  # tls/ and scram/ stay: the next secure start formats with the same users and passwords.
  rm -rf "$DATA" "$CONFIG" "$SCRAM_STAMP"
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
