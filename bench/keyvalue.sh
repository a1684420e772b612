#!/usr/bin/env bash
# wasi:keyvalue store throughput: sets, gets and increments per second on the
# embedded store and on Redis (bench/keyvalue.rs). Not a test: prints figures.
#
#   bench/keyvalue.sh                 # 20,000 operations per kind
#   OPERATIONS=50000 bench/keyvalue.sh
#
# Needs redis-server (apt-get install redis-server); without it, Redis is skipped.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
args=()
if command -v redis-server >/dev/null; then
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null; rm -rf "$dir"' EXIT
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
  args=(--redis "redis://127.0.0.1:$port")
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB"
cargo bench --quiet --bench keyvalue -- "${args[@]}"
