#!/usr/bin/env bash
# Starts Sockudo by hand with the bench's settings (sockudo.env: app herald-bench, key
# herald-bench-key, secret herald-bench-secret, ws://127.0.0.1:6002/app/herald-bench-key).
# herald-bench starts its own instance on free ports; this is for poking at it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-${SOCKUDO_ROOT:-/work/cache/sockudo}/bin/sockudo}"
set -a
# shellcheck source=/dev/null
source "$here/sockudo.env"
set +a
cd "$(mktemp -d)"
exec "$bin"
