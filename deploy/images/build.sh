#!/usr/bin/env bash
# Builds the project's images with podman or docker (deploy/images/engine.sh picks one):
#
#   deploy/images/build.sh service   voucher-bridge:<version>          (deploy/Containerfile)
#   deploy/images/build.sh sandbox   voucher-bridge-sandbox:<version>  (deploy/sandbox.Containerfile)
#   deploy/images/build.sh tag KIND  print the tag only
#   deploy/images/build.sh base      print the base image it would use (making it if needed)
#
# <version> is the distribution's version in its pyproject.toml. podman names them
# localhost/voucher-bridge:<version>.
#
# An image whose inputs label (a hash of the Containerfile, the files it copies, the base
# image's id and the uv version) and revision label (the commit) match is not built again;
# FORCE=1 builds anyway.
#
# Environment:
#   BASE            the base image. Default: the official python:3.11-slim-bookworm where it is
#                   present or can be pulled; else (podman, no registry) the local one made from
#                   Debian's packages by deploy/images/base.sh, made first if missing.
#   BUILD_CA_FILE   a CA bundle or one extra CA certificate for reaching the package registry
#                   during the build (default: $SSL_CERT_FILE when set). Passed as the `ca` build
#                   secret: never in a layer of the image.
#   IMAGE_SOURCE    tree (default): the working tree; head: the project's code as last committed
#                   (`git archive HEAD`), with the build files (deploy/*Containerfile,
#                   deploy/images/) from the tree, e.g. to build while others have uncommitted
#                   changes to the code.
#   IMAGE_TAG       another tag than the default.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
ENGINE="$SCRIPT_DIR/engine.sh"
UV_VERSION="$(sed -n 's/^UV_VERSION := *//p' "$ROOT/Makefile")"
OFFICIAL_BASE=docker.io/library/python:3.11-slim-bookworm
LABEL=org.voucher-bridge.inputs

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

engine() { "$ENGINE" exec "$@"; }

# The files each image is made of (what its Containerfile copies), relative to the root.
inputs_of() {
  case "$1" in
    service) printf '%s\n' deploy/Containerfile deploy/images/with-build-ca pyproject.toml uv.lock \
      README.md contracts sandboxes/pyproject.toml services ;;
    sandbox) printf '%s\n' deploy/sandbox.Containerfile deploy/images/with-build-ca pyproject.toml \
      uv.lock README.md contracts/pyproject.toml sandboxes ;;
  esac
}

containerfile_of() {
  case "$1" in
    service) echo deploy/Containerfile ;;
    sandbox) echo deploy/sandbox.Containerfile ;;
  esac
}

# "version = ..." of the distribution's [project] table.
version_of() {
  local pyproject=pyproject.toml
  [[ "$1" == sandbox ]] && pyproject=sandboxes/pyproject.toml
  sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/$pyproject" | head -n1
}

tag_of() {
  if [[ -n "${IMAGE_TAG:-}" ]]; then
    echo "$IMAGE_TAG"
  elif [[ "$1" == sandbox ]]; then
    echo "localhost/voucher-bridge-sandbox:$(version_of sandbox)"
  else
    echo "localhost/voucher-bridge:$(version_of service)"
  fi
}

image_id() { engine image inspect --format '{{.Id}}' "$1" 2>/dev/null; }

# Sets BASE: the given one, the official one where it can be had, else the Debian-made one.
resolve_base() {
  if [[ -n "${BASE:-}" ]]; then
    return 0
  fi
  if image_id "$OFFICIAL_BASE" >/dev/null \
      || timeout 120 "$ENGINE" exec pull --quiet "$OFFICIAL_BASE" >/dev/null 2>&1; then
    BASE="$OFFICIAL_BASE"
    return 0
  fi
  [[ "$("$ENGINE" name)" == podman ]] \
    || die "$OFFICIAL_BASE cannot be pulled; set BASE (or build a local one: deploy/images/base.sh python, with podman)"
  log "$OFFICIAL_BASE cannot be pulled here; using a base made from Debian's packages"
  "$SCRIPT_DIR/base.sh" python
  BASE="$("$SCRIPT_DIR/base.sh" name python)"
}

# The directory to build from: the working tree, or the last commit exported.
prepare_context() {
  case "${IMAGE_SOURCE:-tree}" in
    tree) CONTEXT="$ROOT" ;;
    head)
      local rev
      rev="$(git -C "$ROOT" rev-parse --short=12 HEAD)"
      CONTEXT="$ROOT/var/images/context-$rev"
      if [[ ! -d "$CONTEXT" ]]; then
        rm -rf "$CONTEXT.tmp"
        mkdir -p "$CONTEXT.tmp"
        git -C "$ROOT" archive HEAD | tar -x -C "$CONTEXT.tmp"
        mv "$CONTEXT.tmp" "$CONTEXT"
      fi
      mkdir -p "$CONTEXT/deploy/images"
      cp "$ROOT"/deploy/*Containerfile "$CONTEXT/deploy/"
      cp "$ROOT"/deploy/images/* "$CONTEXT/deploy/images/"
      cp "$ROOT/.containerignore" "$ROOT/.dockerignore" "$CONTEXT/" 2>/dev/null || true
      ;;
    *) die "IMAGE_SOURCE must be tree or head" ;;
  esac
}

# A hash of everything that goes into the image: its files (as the build sees them, without
# bytecode caches), the base image's id and the uv version.
inputs_hash() {
  local kind="$1"
  (
    cd "$CONTEXT"
    mapfile -t paths < <(inputs_of "$kind")
    local path
    for path in "${paths[@]}"; do
      [[ -e "$path" ]] || die "$CONTEXT/$path is missing"
    done
    {
      printf 'base=%s uv=%s\n' "$(image_id "$BASE")" "$UV_VERSION"
      find "${paths[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
  )
}

revision() {
  local rev
  rev="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)" || { echo unknown; return; }
  if [[ "${IMAGE_SOURCE:-tree}" == tree ]]; then
    mapfile -t paths < <(inputs_of "$1")
    [[ -z "$(git -C "$ROOT" status --porcelain -- "${paths[@]}")" ]] || rev+="-dirty"
  fi
  echo "$rev"
}

# The repository's address without any credentials in it.
source_url() {
  local url
  url="$(git -C "$ROOT" remote get-url origin 2>/dev/null)" || return 0
  printf '%s\n' "$url" | sed -E 's#^([a-z+]+://)[^@/]*@#\1#'
}

build() {
  local kind="$1" tag hash rev current start=$SECONDS args=() ca="${BUILD_CA_FILE:-${SSL_CERT_FILE:-}}"
  tag="$(tag_of "$kind")"
  resolve_base
  image_id "$BASE" >/dev/null || die "base image $BASE is not there"
  prepare_context
  hash="$(inputs_hash "$kind")"
  rev="$(revision "$kind")"
  # Up to date: the same inputs and the same commit, so that the image's revision label never
  # names an older commit (after a commit that changed none of its inputs, only the final
  # stage's labels and layers are made again; the builder stage comes from the layer cache).
  current="$(engine image inspect --format \
    "{{ index .Config.Labels \"$LABEL\" }} {{ index .Config.Labels \"org.opencontainers.image.revision\" }}" \
    "$tag" 2>/dev/null || true)"
  if [[ "$current" == "$hash $rev" && "${FORCE:-0}" != 1 ]]; then
    log "$tag is up to date (inputs $hash, revision $rev)"
    return 0
  fi
  args=(
    -f "$CONTEXT/$(containerfile_of "$kind")" -t "$tag"
    --build-arg "BASE=$BASE" --build-arg "UV_VERSION=$UV_VERSION"
    --build-arg "VERSION=$(version_of "$kind")" --build-arg "REVISION=$rev"
    --build-arg "SOURCE=$(source_url)" --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    --label "$LABEL=$hash"
  )
  if [[ "$("$ENGINE" name)" == podman ]]; then
    # docker format: OCI images cannot carry a HEALTHCHECK. Host network: the build reaches the
    # package registry as this machine does.
    args+=(--format docker --network host)
  fi
  if [[ -n "$ca" ]]; then
    [[ -r "$ca" ]] || die "BUILD_CA_FILE $ca is not readable"
    args+=(--secret "id=ca,src=$ca")
  fi
  log "building $tag from $(containerfile_of "$kind") on $BASE ..."
  mkdir -p "$ROOT/var/images"
  if ! engine build "${args[@]}" "$CONTEXT" >"$ROOT/var/images/build-$kind.log" 2>&1; then
    tail -n 40 "$ROOT/var/images/build-$kind.log" >&2
    die "the build failed (full output: var/images/build-$kind.log)"
  fi
  log "built $tag (inputs $hash) in $((SECONDS - start)) s"
}

# One build of an image at a time (a test session and `make image` at once).
with_lock() {
  mkdir -p "$ROOT/var/images"
  exec 9>"$ROOT/var/images/.build-$1.lock"
  flock -w 1800 9 || die "another build of the $1 image holds var/images/.build-$1.lock"
  build "$1"
}

case "${1:-}" in
  service | sandbox) with_lock "$1" ;;
  tag) tag_of "${2:?usage: build.sh tag service|sandbox}" ;;
  base) resolve_base; printf '%s\n' "$BASE" ;;
  *)
    echo "usage: ${0##*/} service|sandbox|tag KIND|base" >&2
    exit 2
    ;;
esac
