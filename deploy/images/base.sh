#!/usr/bin/env bash
# Local base images made from Debian packages with mmdebstrap, for hosts that cannot pull from
# an image registry (the official images are the defaults everywhere else):
#
#   deploy/images/base.sh python     localhost/voucher-bridge-base/python:3.11-bookworm
#                                    (python3.11 in /usr/bin; stands in for python:3.11-slim-bookworm)
#   deploy/images/base.sh java       localhost/voucher-bridge-base/java:17-bookworm (Kafka stand-in)
#   deploy/images/base.sh postgres   localhost/voucher-bridge-base/postgres:15-bookworm (PostgreSQL stand-in)
#   deploy/images/base.sh all        all three
#   deploy/images/base.sh name KIND  print the image name only
#
# Idempotent: an image whose base-spec label matches what this script would build is kept; the
# root file system is cached as var/images/<kind>.tar (with its spec beside it), so an image
# removed from the engine is imported again without running mmdebstrap. mmdebstrap uses this
# machine's own apt sources (no mirror is named here). Needs root (or unprivileged user
# namespaces) and `apt-get install mmdebstrap`.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
ENGINE="$SCRIPT_DIR/engine.sh"
CACHE="$ROOT/var/images"
SUITE=bookworm
LABEL=org.voucher-bridge.base-spec

log() { printf 'base.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

name_of() {
  case "$1" in
    python) echo localhost/voucher-bridge-base/python:3.11-$SUITE ;;
    java) echo localhost/voucher-bridge-base/java:17-$SUITE ;;
    postgres) echo localhost/voucher-bridge-base/postgres:15-$SUITE ;;
    *) die "unknown base '$1' (python, java, postgres)" ;;
  esac
}

# What goes into each root file system; part of the spec hash, so a change here rebuilds.
packages_of() {
  case "$1" in
    python) echo python3.11,python3.11-venv,ca-certificates ;;
    # bash, coreutils and util-linux (setpriv) are essential, so always there.
    java) echo openjdk-17-jre-headless,ca-certificates ;;
    postgres) echo postgresql,ca-certificates ;;
  esac
}

# Image settings applied on import (`--change`), also part of the spec.
changes_of() {
  printf '%s\n' 'ENV LANG=C.UTF-8' 'CMD ["/bin/bash"]'
  case "$1" in
    postgres) printf '%s\n' 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' ;;
  esac
}

# The package's postinst makes a cluster 15/main; the stand-in's entrypoint makes its own.
customize_of() {
  case "$1" in
    postgres) echo 'rm -rf "$1/var/lib/postgresql/15/main" "$1/etc/postgresql/15/main"' ;;
  esac
}

spec_of() {
  { echo "suite=$SUITE variant=apt"; packages_of "$1"; changes_of "$1"; customize_of "$1"; } \
    | sha256sum | cut -c1-16
}

engine() { "$ENGINE" exec "$@"; }

image_spec() {
  engine image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true
}

build_one() {
  local kind="$1" name spec tar start=$SECONDS hook changes=()
  name="$(name_of "$kind")"
  spec="$(spec_of "$kind")"
  if [[ "$(image_spec "$name")" == "$spec" ]]; then
    log "$name is up to date"
    return 0
  fi
  tar="$CACHE/$kind.tar"
  mkdir -p "$CACHE"
  if [[ ! -s "$tar" || "$(cat "$tar.spec" 2>/dev/null)" != "$spec" ]]; then
    command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
    log "making the $kind root file system with mmdebstrap ($(packages_of "$kind")) ..."
    hook="$(customize_of "$kind")"
    rm -f "$CACHE/$kind.tmp.tar" "$tar.spec"
    mmdebstrap --quiet --variant=apt --include="$(packages_of "$kind")" \
      ${hook:+--customize-hook="$hook"} "$SUITE" "$CACHE/$kind.tmp.tar" >&2 \
      || { rm -f "$CACHE/$kind.tmp.tar"; die "mmdebstrap failed"; }
    mv "$CACHE/$kind.tmp.tar" "$tar"
    printf '%s\n' "$spec" >"$tar.spec"
  fi
  while IFS= read -r change; do changes+=(--change "$change"); done < <(changes_of "$kind")
  changes+=(--change "LABEL $LABEL=$spec")
  engine import "${changes[@]}" "$tar" "$name" >/dev/null 2>"$CACHE/$kind.import.log" \
    || { cat "$CACHE/$kind.import.log" >&2; die "could not import $tar as $name"; }
  log "$name ready ($(du -h "$tar" | cut -f1) root file system) in $((SECONDS - start)) s"
}

with_lock() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock -w 900 9 || die "another base.sh holds $CACHE/.lock"
  "$@"
}

build() {
  local kind
  for kind in "$@"; do build_one "$kind"; done
}

case "${1:-}" in
  python | java | postgres) with_lock build "$1" ;;
  all) with_lock build python java postgres ;;
  name) name_of "${2:?usage: base.sh name python|java|postgres}" ;;
  *)
    echo "usage: ${0##*/} python|java|postgres|all|name KIND" >&2
    exit 2
    ;;
esac
