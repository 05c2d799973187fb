#!/usr/bin/env bash
# Secrets for the local compose stack (deploy/compose/compose.yaml), one file per secret, as
# compose mounts them under /run/secrets/:
#
#   deploy/compose/secrets.sh [DIR]     (default var/compose/secrets)
#
#   postgres_password       random, made once
#   store.env               IDEMPOTENCY_STORE_URL=postgresql://voucher_bridge:<that password>@postgres/...
#                           (an env file: see compose.yaml for why this one is not a secret file)
#   evoucher_terminals      the eVOUCHER sandbox's seeded terminals and tokens (JSON)
#   epin_api_key            the Epin sandbox's seeded application key
#   epin_accounts           the Epin sandbox's seeded users (JSON)
#   console_users           the operator console's logins: viewer and operator, random
#                           passwords, made once (JSON; read them here to log in)
#
# The service reads the last four from its secrets directory (VOUCHER_BRIDGE_SECRETS_DIR, a file
# per setting), PostgreSQL its password from POSTGRES_PASSWORD_FILE. The sandbox values are the
# doubles' own published seeds, not secrets of any real system; for a real upstream write its
# tokens into these files instead. Existing files are kept (a new password would lock the
# service out of a PostgreSQL volume made with the old one): delete a file to make it anew.
# The directory is private (0700); the files are 0644 because compose bind-mounts them as they
# are, and the containers' users (not root) must read them.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
DIR="${1:-$ROOT/var/compose/secrets}"
SEEDS="$ROOT/sandboxes/src/voucher_sandboxes/seeds"

log() { printf 'secrets.sh: %s\n' "$*" >&2; }

NAMES=(postgres_password store.env evoucher_terminals epin_api_key epin_accounts console_users)

# Only its own files are ever written or changed; a directory it makes is private.
if [[ ! -d "$DIR" ]]; then
  (umask 077 && mkdir -p "$DIR")
fi

# write NAME: the value from stdin, unless the file exists.
write() {
  local file="$DIR/$1"
  if [[ -s "$file" ]]; then
    cat >/dev/null
    return 0
  fi
  (umask 022 && cat >"$file.tmp.$$") && mv "$file.tmp.$$" "$file"
  log "wrote $file"
}

od -An -tx1 -N24 /dev/urandom | tr -d ' \n' | write postgres_password
printf 'IDEMPOTENCY_STORE_URL=postgresql://voucher_bridge:%s@postgres:5432/voucher_bridge\n' \
  "$(<"$DIR/postgres_password")" | write store.env

python3 - "$SEEDS" "$DIR" <<'PY'
import json
import secrets
import sys
from pathlib import Path

seeds, out = Path(sys.argv[1]), Path(sys.argv[2])
evoucher = json.loads((seeds / "evoucher-seed.json").read_text())
epin = json.loads((seeds / "epin-seed.json").read_text())
values = {
    "evoucher_terminals": json.dumps({t["machine_name"]: t["token"] for t in evoucher["terminals"]}),
    "epin_api_key": epin["api_key"],
    "epin_accounts": json.dumps(
        {u["username"]: {"username": u["username"], "password": u["password"]} for u in epin["users"]}
    ),
    "console_users": json.dumps(
        {role: {"password": secrets.token_urlsafe(12), "role": role} for role in ("viewer", "operator")}
    ),
}
for name, value in values.items():
    path = out / name
    if not path.exists() or path.stat().st_size == 0:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(value)
        tmp.chmod(0o644)
        tmp.replace(path)
        print(f"secrets.sh: wrote {path}", file=sys.stderr)
PY
for name in "${NAMES[@]}"; do chmod 0644 "$DIR/$name"; done
# Read by compose itself (the user running it), not by a container.
chmod 0600 "$DIR/store.env"
