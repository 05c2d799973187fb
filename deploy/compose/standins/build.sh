#!/usr/bin/env bash
# TEST STAND-INS for the official Kafka and PostgreSQL images, for hosts that cannot pull from
# an image registry (the CI sandbox). deploy/compose/compose.yaml uses the official images by
# default; a test points KAFKA_IMAGE / POSTGRES_IMAGE at these. They honour the environment the
# compose file gives the official images, so the file is the same for both.
#
#   deploy/compose/standins/build.sh kafka      localhost/voucher-bridge-standin/kafka:<version>
#                                               (<version>: deploy/kafka/pom.xml's kafka.version)
#   deploy/compose/standins/build.sh postgres   localhost/voucher-bridge-standin/postgres:15
#   deploy/compose/standins/build.sh all
#   deploy/compose/standins/build.sh tag KIND   print the tag only
#
# Made from Debian's packages (deploy/images/base.sh java|postgres) and, for Kafka, the jars
# deploy/kafka/kafka.sh fetches from Maven Central plus kafka-tools (kafka-topics.sh,
# kafka-broker-api-versions.sh, ...). An image whose inputs label matches is not built again
# (FORCE=1 builds anyway). Staging and caches live in var/compose/standins/.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../../.." && pwd -P)"
IMAGES="$ROOT/deploy/images"
ENGINE="$IMAGES/engine.sh"
VAR="$ROOT/var/compose/standins"
LABEL=org.voucher-bridge.inputs
MVN="${MVN:-mvn}"

log() { printf 'standins/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

engine() { "$ENGINE" exec "$@"; }

kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/deploy/kafka/pom.xml" | head -n1
}

tag_of() {
  case "$1" in
    kafka) echo "localhost/voucher-bridge-standin/kafka:$(kafka_version)" ;;
    postgres) echo localhost/voucher-bridge-standin/postgres:15 ;;
    *) die "unknown stand-in '$1' (kafka, postgres)" ;;
  esac
}

# The broker's jars (kafka.sh's, once per its pom.xml) and kafka-tools of the same version.
stage_kafka() {
  local version tools ctx
  version="$(kafka_version)"
  "$ROOT/deploy/kafka/kafka.sh" fetch
  tools="$VAR/kafka-tools-$version"
  if [[ ! -s "$tools/kafka-tools-$version.jar" ]]; then
    command -v "$MVN" >/dev/null || die "Maven ('$MVN') is needed once to fetch kafka-tools"
    mkdir -p "$VAR"
    rm -rf "$tools.tmp"
    # kafka-tools alone: its dependencies that the tools used here need are the broker's own
    # (its full closure would add Kafka Connect, ~40 jars the stand-in has no use for).
    "$MVN" -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
      -Dartifact="org.apache.kafka:kafka-tools:$version" -DoutputDirectory="$tools.tmp" \
      >"$VAR/kafka-tools.log" 2>&1 \
      || { tail -n 20 "$VAR/kafka-tools.log" >&2; die "Maven could not fetch kafka-tools $version"; }
    mv "$tools.tmp" "$tools"
  fi
  ctx="$VAR/kafka-context"
  rm -rf "$ctx"
  mkdir -p "$ctx/libs"
  cp -a "$SCRIPT_DIR/kafka/." "$ctx/"
  # Hard links where the file system allows: the jars are 45 MB.
  cp -l "$ROOT"/var/kafka/libs/*.jar "$tools"/*.jar "$ctx/libs/" 2>/dev/null \
    || cp "$ROOT"/var/kafka/libs/*.jar "$tools"/*.jar "$ctx/libs/"
  CONTEXT="$ctx"
  BUILD_ARGS=(--build-arg "KAFKA_VERSION=$version")
}

stage_postgres() {
  CONTEXT="$SCRIPT_DIR/postgres"
  BUILD_ARGS=()
}

build_one() {
  local kind="$1" tag base hash current start
  tag="$(tag_of "$kind")"
  case "$kind" in
    kafka) "$IMAGES/base.sh" java; base="$("$IMAGES/base.sh" name java)"; stage_kafka ;;
    postgres) "$IMAGES/base.sh" postgres; base="$("$IMAGES/base.sh" name postgres)"; stage_postgres ;;
  esac
  hash="$(
    cd "$CONTEXT"
    {
      engine image inspect --format '{{.Id}}' "$base"
      find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
  )"
  current="$(engine image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$tag" 2>/dev/null || true)"
  if [[ "$current" == "$hash" && "${FORCE:-0}" != 1 ]]; then
    log "$tag is up to date (inputs $hash)"
    return 0
  fi
  start=$SECONDS
  log "building the $kind stand-in $tag on $base ..."
  mkdir -p "$VAR"
  local format=()
  [[ "$("$ENGINE" name)" == podman ]] && format=(--format docker)
  if ! engine build "${format[@]}" -t "$tag" --build-arg "BASE=$base" "${BUILD_ARGS[@]}" \
      --label "$LABEL=$hash" "$CONTEXT" >"$VAR/build-$kind.log" 2>&1; then
    tail -n 30 "$VAR/build-$kind.log" >&2
    die "the build failed (full output: $VAR/build-$kind.log)"
  fi
  log "built $tag in $((SECONDS - start)) s"
}

with_lock() {
  mkdir -p "$VAR"
  exec 9>"$VAR/.lock"
  flock -w 1800 9 || die "another standins/build.sh holds $VAR/.lock"
  local kind
  for kind in "$@"; do build_one "$kind"; done
}

case "${1:-}" in
  kafka | postgres) with_lock "$1" ;;
  all) with_lock kafka postgres ;;
  tag) tag_of "${2:?usage: build.sh tag kafka|postgres}" ;;
  *)
    echo "usage: ${0##*/} kafka|postgres|all|tag KIND" >&2
    exit 2
    ;;
esac
