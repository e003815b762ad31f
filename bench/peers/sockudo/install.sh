#!/usr/bin/env bash
# Installs Sockudo (crates.io) outside the repository: a long build (≈ 6–12 min on 2 cores, more
# under load). Its build needs `protoc`. The binary lands in $SOCKUDO_ROOT/bin/sockudo, where
# `herald-bench … --target sockudo` looks by default (or pass --server-bin <path>).
set -euo pipefail
SOCKUDO_ROOT="${SOCKUDO_ROOT:-/work/cache/sockudo}"
SOCKUDO_VERSION="${SOCKUDO_VERSION:-5.2.0}"
if ! command -v protoc >/dev/null; then
    apt-get update && apt-get install -y protobuf-compiler
fi
nice -n 19 cargo install sockudo --version "$SOCKUDO_VERSION" --locked --root "$SOCKUDO_ROOT"
"$SOCKUDO_ROOT/bin/sockudo" --version || true
