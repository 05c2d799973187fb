#!/usr/bin/env bash
# The container engine for the project's image builds, tests and compose: podman or docker,
# whichever exists ($CONTAINER_ENGINE picks one), with what this host needs to run containers.
#
#   deploy/images/engine.sh name          print the engine (podman or docker); exit 3 if none
#   deploy/images/engine.sh configure     podman: write containers.conf where none exists (and
#                                         say so); never changes an existing one
#   deploy/images/engine.sh global-flags  print the engine's global flags for this host, one a line
#   deploy/images/engine.sh run-flags     print the flags `run`/`build` need here, one a line
#   deploy/images/engine.sh exec ARGS...  configure, then run the engine with both sets of flags
#                                         in the right places (`exec build ...`, `exec run ...`)
#
# VOUCHER_BRIDGE_ENGINE_CONFIGURE=0: `exec` writes no containers.conf (the flags alone do; the
# tests run so, and change nothing on the host).
#
# Why: on a host without systemd, with cgroups v1 and without CAP_SYS_RESOURCE (a CI sandbox),
# podman's defaults fail: crun refuses cgroups in hybrid mode, the systemd cgroup manager has
# no systemd to talk to, and raising the open-files limit to podman's default is refused. runc,
# the cgroupfs manager and limits no higher than the current hard ones work. Elsewhere (a
# desktop with systemd and crun) nothing is changed.
set -euo pipefail

log() { printf 'engine.sh: %s\n' "$*" >&2; }

engine() {
  if [[ -n "${CONTAINER_ENGINE:-}" ]]; then
    command -v "$CONTAINER_ENGINE" >/dev/null || { log "CONTAINER_ENGINE=$CONTAINER_ENGINE not found"; return 3; }
    printf '%s\n' "$CONTAINER_ENGINE"
  elif command -v podman >/dev/null; then
    echo podman
  elif command -v docker >/dev/null; then
    echo docker
  else
    log "neither podman nor docker is installed (Debian: apt-get install podman runc)"
    return 3
  fi
}

is_podman() { [[ "$(basename "$1")" == podman ]]; }

# True when systemd runs this host (its cgroup manager can be used).
have_systemd() { [[ -d /run/systemd/system ]]; }

# True when the unified cgroup v2 hierarchy is mounted at /sys/fs/cgroup.
cgroup_v2() { [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" == cgroup2fs ]]; }

# runc where crun cannot work (cgroups v1 or hybrid) or is missing; nothing otherwise.
podman_runtime() {
  if command -v runc >/dev/null && { ! cgroup_v2 || ! command -v crun >/dev/null; }; then
    echo runc
  fi
}

podman_cgroup_manager() { have_systemd || echo cgroupfs; }

# Limits for containers where the host's hard limits are below podman's defaults (1048576 open
# files, 4194304 processes): a process without CAP_SYS_RESOURCE may not raise them, and runc
# then refuses to start the container. Open files: the current hard limit. Processes: 4096
# (podman lowers its own process limit before it starts runc, to 32768 on the CI sandbox, so
# the shell's hard limit is not what runc may set; 4096 is per user id, and plenty).
ulimits() {
  local nofile nproc
  nofile="$(ulimit -Hn)"
  nproc="$(ulimit -Hu)"
  if [[ "$nofile" != unlimited ]] && ((nofile < 1048576)); then
    printf 'nofile=%s:%s\n' "$nofile" "$nofile"
  fi
  if [[ "$nproc" != unlimited ]] && ((nproc < 4194304)); then
    ((nproc < 4096)) || nproc=4096
    printf 'nproc=%s:%s\n' "$nproc" "$nproc"
  fi
}

conf_path() {
  if ((EUID == 0)); then
    echo /etc/containers/containers.conf
  else
    echo "${XDG_CONFIG_HOME:-$HOME/.config}/containers/containers.conf"
  fi
}

# podman-compose and plain `podman` calls get the same settings from containers.conf, so it is
# written where none exists. An existing file is the host owner's: left as it is.
cmd_configure() {
  local e conf runtime manager limits
  e="$(engine)"
  is_podman "$e" || return 0
  conf="$(conf_path)"
  [[ -e "$conf" ]] && return 0
  runtime="$(podman_runtime)"
  manager="$(podman_cgroup_manager)"
  limits="$(ulimits | sed 's/.*/"&"/' | paste -sd, -)"
  [[ -n "$runtime$manager$limits" ]] || return 0
  mkdir -p "$(dirname "$conf")"
  {
    echo "# Written by voucher-bridge's deploy/images/engine.sh because none existed: what podman"
    echo "# needs on this host (no systemd, cgroups v1/hybrid or no CAP_SYS_RESOURCE). Edit freely;"
    echo "# the script never touches an existing file."
    echo "[containers]"
    [[ -z "$limits" ]] || echo "default_ulimits = [$limits]"
    echo "[engine]"
    [[ -z "$runtime" ]] || echo "runtime = \"$runtime\""
    [[ -z "$manager" ]] || echo "cgroup_manager = \"$manager\""
  } >"$conf.tmp.$$"
  mv "$conf.tmp.$$" "$conf"
  log "wrote $conf (none existed):"
  sed 's/^/    /' "$conf" | grep -v '^    #' >&2
}

cmd_global_flags() {
  local e runtime manager
  e="$(engine)"
  is_podman "$e" || return 0
  runtime="$(podman_runtime)"
  manager="$(podman_cgroup_manager)"
  [[ -z "$runtime" ]] || printf -- '--runtime\n%s\n' "$runtime"
  [[ -z "$manager" ]] || printf -- '--cgroup-manager\n%s\n' "$manager"
}

# Only podman: a docker daemon runs with its own (root) limits.
cmd_run_flags() {
  local limit
  is_podman "$(engine)" || return 0
  while IFS= read -r limit; do
    [[ -n "$limit" ]] && printf -- '--ulimit\n%s\n' "$limit"
  done < <(ulimits)
}

cmd_exec() {
  local e sub globals=() extra=()
  e="$(engine)"
  [[ "${VOUCHER_BRIDGE_ENGINE_CONFIGURE:-1}" == 0 ]] || cmd_configure
  mapfile -t globals < <(cmd_global_flags)
  sub="${1:-}"
  [[ -n "$sub" ]] && shift
  case "$sub" in
    run | create | build) mapfile -t extra < <(cmd_run_flags) ;;
  esac
  exec "$e" "${globals[@]}" ${sub:+"$sub"} "${extra[@]}" "$@"
}

case "${1:-}" in
  name) engine ;;
  configure) cmd_configure ;;
  global-flags) cmd_global_flags ;;
  run-flags) cmd_run_flags ;;
  exec) shift; cmd_exec "$@" ;;
  *)
    echo "usage: ${0##*/} name|configure|global-flags|run-flags|exec ARGS..." >&2
    exit 2
    ;;
esac
