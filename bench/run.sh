#!/usr/bin/env bash
# Runs one herald-bench scenario against a freshly built Herald (started by the bench with a
# generated config: memory store — S6: the store of `--store` —, known secret, raised rate
# limits) or against a peer
# (`--target nats|node-ws|socketio|sockudo|rabbitmq-stomp`, started by the bench on free loopback
# ports; see bench/peers/README.md; `--target herald-stomp` is Herald through its STOMP endpoint) and records the results in bench/results/<scenario>-<date>.{json,md}.
#
#   bench/run.sh idle    [-n 19000]                       # S1
#   bench/run.sh connect [-n 10000]                       # S2
#   bench/run.sh fanout  [-s 10000 --rates 5,20,50]       # S3 (add --target <peer> for a peer)
#   bench/run.sh latency [-s 1000 --rate 20]              # S4
#   bench/run.sh many-topics [-n 10000 -m 1000000]         # S5 (Herald only)
#   bench/run.sh durable [--store sqlite|postgres -u 1000 -m 100000]   # S6 (Herald only)
#
# Extra arguments go to `herald-bench <scenario>`; see `herald-bench <scenario> --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:?usage: bench/run.sh idle|connect|fanout|latency|many-topics|durable [args…]}"
shift
target=herald
prev=
for arg in "$@"; do
    case "$arg" in
        --target=*) target="${arg#--target=}" ;;
    esac
    if [ "$prev" = "--target" ]; then target="$arg"; fi
    prev="$arg"
done
if [ "$target" != herald ] && [ "$target" != herald-stomp ]; then
    # A peer: the bench starts it itself (--server-bin overrides its binary).
    cargo build --release -q -p herald-bench
    exec target/release/herald-bench "$scenario" "$@"
fi
cargo build --release -q -p herald -p herald-bench
# Run a copy of the server binary, so a rebuild during the run cannot change it underneath.
bin_dir="$(mktemp -d)"
trap 'rm -rf "$bin_dir"' EXIT
cp target/release/herald "$bin_dir/herald"
target/release/herald-bench "$scenario" --server-bin "$bin_dir/herald" "$@"
