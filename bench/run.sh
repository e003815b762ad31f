#!/usr/bin/env bash
# Runs one herald-bench scenario against a freshly built Herald (started by the bench with a
# generated config: memory store, known secret, raised rate limits) and records the results in
# bench/results/<scenario>-<date>.{json,md}.
#
#   bench/run.sh idle    [-n 19000]                       # S1
#   bench/run.sh connect [-n 10000]                       # S2
#   bench/run.sh fanout  [-s 10000 --rates 5,20,50]       # S3 (add --target nats for the NATS peer)
#   bench/run.sh latency [-s 1000 --rate 20]              # S4
#
# Extra arguments go to `herald-bench <scenario>`; see `herald-bench <scenario> --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:?usage: bench/run.sh idle|connect|fanout|latency [args…]}"
shift
cargo build --release -q -p herald -p herald-bench
# Run a copy of the server binary, so a rebuild during the run cannot change it underneath.
bin_dir="$(mktemp -d)"
trap 'rm -rf "$bin_dir"' EXIT
cp target/release/herald "$bin_dir/herald"
target/release/herald-bench "$scenario" --server-bin "$bin_dir/herald" "$@"
