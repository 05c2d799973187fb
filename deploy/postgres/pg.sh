#!/usr/bin/env bash
# Local PostgreSQL server for tests (no Docker): one cluster in <project>/var/postgres/data,
# listening on 127.0.0.1:$PG_PORT only, trust auth, a superuser and a database both named
# voucher_bridge. Everything it writes lives under <project>/var/postgres/. It never touches a
# cluster of the distribution (Debian's 15/main on 5432, managed by pg_ctlcluster).
#
#   deploy/postgres/pg.sh up       start the server (or reuse one already answering on the port),
#                                  wait until it accepts connections, create the database if
#                                  missing, print the URL on stdout; runs initdb on first use and
#                                  installs Debian's postgresql package when no server binaries
#                                  are found and we are root
#   deploy/postgres/pg.sh down     stop the server started by `up` (fast shutdown)
#   deploy/postgres/pg.sh status   print whether it runs (exit 0 running, 3 not running)
#   deploy/postgres/pg.sh reset    down, then delete var/postgres/data
#   deploy/postgres/pg.sh url      print postgresql://voucher_bridge@127.0.0.1:$PG_PORT/voucher_bridge
#
# Environment:
#   PG_PORT (55432)  PG_START_TIMEOUT (60 s)  PG_STOP_TIMEOUT (60 s)
#   PG_BINDIR (directory holding initdb/pg_ctl/postgres; found automatically when unset)
#   PG_OS_USER (postgres; the account the server runs as when this script runs as root)
#   PG_STATE_DIR (where the cluster lives; default var/postgres, or /var/tmp/… when root runs it
#   in a project the server's account cannot reach)
#   PG_EXTRA_OPTS (extra postgres options appended to the pg_ctl -o string, e.g. "-c log_statement=all")
#
# Only `up` writes to stdout (the URL); all messages go to stderr.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"

HOST=127.0.0.1
PG_PORT="${PG_PORT:-55432}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
PG_STOP_TIMEOUT="${PG_STOP_TIMEOUT:-60}"
PG_OS_USER="${PG_OS_USER:-postgres}"
PG_EXTRA_OPTS="${PG_EXTRA_OPTS:-}"
DB_USER=voucher_bridge
DB_NAME=voucher_bridge

# True when every directory from $1 up to / lets others search it (the server runs as another
# account than root and must reach its data directory).
world_searchable() {
  local dir="$1"
  while [[ "$dir" != "/" ]]; do
    (( 8#$(stat -c %a "$dir") & 1 )) || return 1
    dir="$(dirname "$dir")"
  done
}

# The cluster lives in the project's var/postgres, unless this runs as root in a project the
# server's account cannot reach (a clone in a private directory, as `mktemp -d` makes one):
# then in a directory of its own under /var/tmp, named after the project's path.
VAR="$ROOT/var/postgres"
if ((EUID == 0)) && [[ -z "${PG_STATE_DIR:-}" ]] && ! world_searchable "$ROOT"; then
  VAR="/var/tmp/voucher-bridge-postgres-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
fi
VAR="${PG_STATE_DIR:-$VAR}"
DATA="$VAR/data"
SOCK_DIR="$VAR/run"
SERVER_LOG="$VAR/server.log"
INITDB_LOG="$VAR/initdb.log"
APT_LOG="$VAR/apt.log"
URL="postgresql://$DB_USER@$HOST:$PG_PORT/$DB_NAME"

log() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$PG_PORT" =~ ^[0-9]+$ ]] || die "PG_PORT must be a number, got '$PG_PORT'"

# ---------------------------------------------------------------------------------------------
# binaries

# True when $1 holds a complete set of server binaries.
is_bindir() {
  local b
  for b in postgres initdb pg_ctl pg_isready psql; do
    [[ -x "$1/$b" ]] || return 1
  done
}

# Prints the bindir to use: $PG_BINDIR; else the major version the data dir was made with;
# else `pg_config --bindir` (Debian's pg_config comes with libpq-dev and may name a dir without
# the server); else the newest /usr/lib/postgresql/*/bin; else wherever initdb is on PATH.
find_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then
    is_bindir "$PG_BINDIR" || die "PG_BINDIR=$PG_BINDIR lacks postgres/initdb/pg_ctl/pg_isready/psql"
    printf '%s\n' "$PG_BINDIR"
    return 0
  fi
  local candidates=() d major
  if [[ -f "$DATA/PG_VERSION" ]]; then
    major="$(<"$DATA/PG_VERSION")"
    candidates+=("/usr/lib/postgresql/$major/bin")
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null)" && candidates+=("$d")
  fi
  while IFS= read -r d; do
    [[ -n "$d" ]] && candidates+=("$d")
  done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -t/ -k5,5 -rV)
  if command -v initdb >/dev/null 2>&1; then
    d="$(readlink -f "$(command -v initdb)")" && candidates+=("${d%/*}")
  fi
  for d in "${candidates[@]}"; do
    if is_bindir "$d"; then
      printf '%s\n' "$d"
      return 0
    fi
  done
  return 1
}

install_server() {
  ((EUID == 0)) || die "no PostgreSQL server binaries found; install Debian's 'postgresql' package (or set PG_BINDIR)"
  command -v apt-get >/dev/null || die "no PostgreSQL server binaries found and no apt-get to install them (set PG_BINDIR)"
  local start=$SECONDS
  mkdir -p "$VAR"
  log "no PostgreSQL server binaries found; installing Debian's postgresql package (log: $APT_LOG)"
  # Note: the package's postinst may create (and try to start) its own cluster 15/main on 5432
  # via pg_ctlcluster. We do not use that one and leave it alone.
  {
    printf '\n=== %s pg.sh up: apt-get install postgresql ===\n' "$(date -Is)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
  } >>"$APT_LOG" 2>&1 9>&- || { tail -n 30 "$APT_LOG" >&2; die "apt-get install postgresql failed (full output: $APT_LOG)"; }
  log "installed postgresql in $((SECONDS - start)) s"
}

# Sets BINDIR (installing the server first when needed).
resolve_bindir() {
  if ! BINDIR="$(find_bindir)"; then
    install_server
    BINDIR="$(find_bindir)" || die "postgresql installed, but still no server binaries found"
  fi
}

server_version() { "$BINDIR/postgres" --version | awk '{print $3}'; }

# ---------------------------------------------------------------------------------------------
# the OS account: postgres refuses to run as root

# Runs "$@" as the account that owns the cluster: ourselves, or $PG_OS_USER when we are root.
# fd 9 (the pg.sh lock) is closed so that the postmaster that pg_ctl forks never holds it.
as_pg() {
  if ((EUID != 0)); then
    (cd "$VAR" && "$@") 9>&-
  elif command -v runuser >/dev/null 2>&1; then
    (cd "$VAR" && runuser -u "$PG_OS_USER" -- "$@") 9>&-
  else
    # shellcheck disable=SC2016  # $0 and $@ are expanded by the inner shell
    # `--`: without it su takes the command's own options (`test -w`) as its own.
    (cd "$VAR" && su -s /bin/sh "$PG_OS_USER" -c 'exec "$0" "$@"' -- "$@") 9>&-
  fi
}

# As root: make sure $PG_OS_USER exists, can reach var/postgres, and owns it.
prepare_os_user() {
  mkdir -p "$VAR"
  ((EUID == 0)) || return 0
  if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
    log "creating system user $PG_OS_USER (postgres refuses to run as root)"
    useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home \
      --shell /bin/bash --comment 'PostgreSQL administrator' "$PG_OS_USER"
  fi
  # Not recursive into data/ (can be big); initdb creates it as $PG_OS_USER anyway. A data dir
  # made by someone else (e.g. a non-root run) is handed over, or postgres would refuse it.
  chown "$PG_OS_USER:" "$VAR"
  local f
  for f in "$SOCK_DIR" "$SERVER_LOG" "$INITDB_LOG"; do
    [[ -e "$f" ]] && chown "$PG_OS_USER:" "$f"
  done
  if [[ -d "$DATA" && "$(stat -c %U "$DATA")" != "$PG_OS_USER" ]]; then
    log "handing $DATA over to $PG_OS_USER"
    chown -R "$PG_OS_USER:" "$DATA"
  fi
  as_pg test -w "$VAR" \
    || die "user $PG_OS_USER cannot write $VAR (a parent directory is not searchable by it?)"
}

# ---------------------------------------------------------------------------------------------
# probes

# Prints the postmaster pid from data/postmaster.pid if that process is alive and is a postgres
# serving our data dir (guards against stale pid files and pid reuse).
running_pid() {
  [[ -f "$DATA/postmaster.pid" ]] || return 1
  local pid cmdline
  pid="$(head -n1 "$DATA/postmaster.pid" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || return 1
  [[ "$cmdline" == *postgres* && "$cmdline" == *" -D $DATA "* ]] || return 1
  printf '%s\n' "$pid"
}

# The port our running postmaster was started with (line 4 of postmaster.pid).
running_port() { sed -n 4p "$DATA/postmaster.pid" 2>/dev/null; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PG_PORT" 2>/dev/null; }

# pg_isready: 0 accepting, 1 rejecting (starting up / shutting down), 2 no answer.
ready() { "$BINDIR/pg_isready" -q -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres -t 2; }

psql_admin() {
  "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres "$@"
}

ensure_database() {
  local exists
  exists="$(psql_admin -tAc "select 1 from pg_database where datname = '$DB_NAME'")" \
    || die "cannot connect to $HOST:$PG_PORT as $DB_USER"
  if [[ "$exists" != 1 ]]; then
    psql_admin -c "create database $DB_NAME" >&2 || die "could not create database $DB_NAME"
    log "created database $DB_NAME"
  fi
}

# Byte offset of server.log where this run's output starts (set by start_server).
LOG_OFFSET=0

show_log() {
  [[ -s "$SERVER_LOG" ]] || return 0
  printf -- '--- last lines of %s ---\n' "$SERVER_LOG" >&2
  tail -c "+$((LOG_OFFSET + 1))" "$SERVER_LOG" | tail -n 30 >&2
}

# ---------------------------------------------------------------------------------------------
# initdb, start, stop

init_cluster() {
  [[ -f "$DATA/PG_VERSION" && -f "$DATA/postgresql.conf" ]] && return 0
  local tmp="$VAR/data.tmp" locale=C
  # C.UTF-8: byte-order collation (fast, stable) with UTF-8 character classes; plain C otherwise.
  if locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$'; then locale=C.UTF-8; fi
  rm -rf "$tmp" "$DATA"
  log "initdb $DATA (PostgreSQL $(server_version), superuser $DB_USER, UTF8, locale $locale)"
  # Trust auth is acceptable only because the server listens on 127.0.0.1 and on a socket in
  # var/postgres/run; initdb's pg_hba.conf lists just local, 127.0.0.1/32 and ::1/128.
  # --no-sync: a test cluster needs no durability (see fsync=off below).
  if ! as_pg "$BINDIR/initdb" -D "$tmp" -U "$DB_USER" -E UTF8 --locale="$locale" \
      --auth=trust --no-sync >>"$INITDB_LOG" 2>&1; then
    tail -n 30 "$INITDB_LOG" >&2
    rm -rf "$tmp"
    die "initdb failed (full output: $INITDB_LOG)"
  fi
  # Renamed only once complete, so an interrupted initdb never leaves a half-made data dir behind.
  mv "$tmp" "$DATA"
}

# Unix socket paths are limited to 107 bytes; with a deep project path, go TCP-only.
socket_dirs() {
  local sock="$SOCK_DIR/.s.PGSQL.$PG_PORT"
  if ((${#sock} > 100)); then
    log "socket path $sock is too long for a Unix socket; listening on TCP only"
    printf ''
  else
    printf '%s' "$SOCK_DIR"
  fi
}

start_server() {
  local sockets opts
  sockets="$(socket_dirs)"
  [[ -z "$sockets" ]] || as_pg mkdir -p "$SOCK_DIR"
  [[ -f "$SERVER_LOG" ]] && LOG_OFFSET="$(stat -c %s "$SERVER_LOG")"
  # fsync/synchronous_commit/full_page_writes off: fast, and fine for a throwaway test server;
  # a crash of the machine (not of postgres) can corrupt the cluster (then: pg.sh reset).
  opts="-p $PG_PORT -k '$sockets' -c listen_addresses=$HOST"
  opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
  [[ -z "$PG_EXTRA_OPTS" ]] || opts+=" $PG_EXTRA_OPTS"
  printf '\n=== %s pg.sh up: starting PostgreSQL %s on %s:%s ===\n' \
    "$(date -Is)" "$(server_version)" "$HOST" "$PG_PORT" | as_pg tee -a "$SERVER_LOG" >/dev/null
  # -W: do not wait here, wait_ready does (and shows the log on failure). pg_ctl starts the
  # postmaster in its own session with stdin from /dev/null and output to the log, so it
  # outlives this script and holds no pipe of whoever called us.
  as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$SERVER_LOG" -W -o "$opts" start >&2 \
    || { show_log; die "pg_ctl start failed"; }
}

# Waits until the server accepts connections; $1 = "stop" stops it on timeout (only for a
# server this run started).
wait_ready() {
  local on_timeout="${1:-}" deadline=$((SECONDS + PG_START_TIMEOUT)) gone_since=""
  while :; do
    ready && return 0
    if running_pid >/dev/null; then
      gone_since=""
    else
      # No live postmaster for our data dir: give a just-forked one a moment to write its pid
      # file; after that it has died (bad option, port taken, ...) or was stopped.
      [[ -n "$gone_since" ]] || gone_since=$SECONDS
      if ((SECONDS - gone_since >= 3)); then
        show_log
        die "the server is not running (it exited during startup?)"
      fi
    fi
    if ((SECONDS >= deadline)); then
      show_log
      if [[ "$on_timeout" == stop ]]; then
        stop_server
        die "the server did not accept connections on $HOST:$PG_PORT within ${PG_START_TIMEOUT} s; stopped it"
      fi
      die "the server did not accept connections on $HOST:$PG_PORT within ${PG_START_TIMEOUT} s"
    fi
    sleep 0.2
  done
}

stop_server() {
  running_pid >/dev/null || return 0
  if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -t "$PG_STOP_TIMEOUT" -w stop >&2; then
    log "fast shutdown did not finish in ${PG_STOP_TIMEOUT} s; immediate shutdown"
    as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >&2 || true
  fi
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_up() {
  local start=$SECONDS pid port
  resolve_bindir
  if pid="$(running_pid)"; then
    port="$(running_port)"
    if [[ "$port" != "$PG_PORT" ]]; then
      die "the server of $DATA already runs on port $port (pid $pid); use PG_PORT=$port, or pg.sh down first"
    fi
    log "server already started by pg.sh (pid $pid); checking that it accepts connections"
    wait_ready
    ensure_database
    log "PostgreSQL ready on $HOST:$PG_PORT (pid $pid)"
    printf '%s\n' "$URL"
    return 0
  fi
  if port_open; then
    # Not ours (or ours from another checkout): reuse it if it is a PostgreSQL that lets us in.
    if ready && psql_admin -tAc 'select 1' >/dev/null 2>&1; then
      log "reusing the PostgreSQL server already answering on $HOST:$PG_PORT"
      ensure_database
      printf '%s\n' "$URL"
      return 0
    fi
    die "$HOST:$PG_PORT is in use by something that does not accept $DB_USER as a PostgreSQL server (set PG_PORT)"
  fi

  prepare_os_user
  init_cluster
  start_server
  wait_ready stop
  pid="$(running_pid)" || pid="?"
  ensure_database
  log "PostgreSQL $(server_version) ready on $HOST:$PG_PORT (pid $pid) after $((SECONDS - start)) s"
  printf '%s\n' "$URL"
}

cmd_down() {
  local pid
  if ! pid="$(running_pid)"; then
    if port_open; then
      log "no server started by pg.sh runs; $HOST:$PG_PORT is served by something else (left alone)"
    else
      log "not running"
    fi
    return 0
  fi
  BINDIR="$(find_bindir)" || die "server (pid $pid) runs, but no pg_ctl found to stop it (set PG_BINDIR)"
  log "stopping server (pid $pid)"
  stop_server
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    if [[ "$(running_port)" != "$PG_PORT" ]]; then
      echo "running on another port: pid $pid, port $(running_port) (PG_PORT is $PG_PORT)"
    elif port_open; then
      echo "running: pid $pid, $URL"
    else
      echo "starting (or unhealthy): pid $pid, $HOST:$PG_PORT not open yet"
    fi
    return 0
  fi
  if port_open; then
    echo "port open: $HOST:$PG_PORT is served by a process not started by pg.sh"
    return 0
  fi
  echo "not running"
  return 3
}

cmd_reset() {
  cmd_down
  rm -rf "$DATA" "$VAR/data.tmp"
  log "deleted $DATA"
}

with_lock() {
  mkdir -p "$VAR"
  exec 9>>"$VAR/.lock"
  flock -w 900 9 || die "another pg.sh holds $VAR/.lock"
  "$@"
}

case "${1:-}" in
  up) with_lock cmd_up ;;
  down) with_lock cmd_down ;;
  reset) with_lock cmd_reset ;;
  status) cmd_status ;;
  url) printf '%s\n' "$URL" ;;
  *)
    echo "usage: ${0##*/} up|down|status|reset|url" >&2
    exit 2
    ;;
esac
