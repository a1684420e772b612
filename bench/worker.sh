#!/usr/bin/env bash
# Worker throughput: messages/s through the embedded queue and through Redis
# with a no-op worker guest at scale 1, 2 and 8, against a native no-op
# consumer of the same queue (the limit). Not a test: prints figures.
#
#   bench/worker.sh               # 50,000 messages per run
#   MESSAGES=20000 bench/worker.sh
#
# Needs redis-server (apt-get install redis-server); without it, Redis is skipped.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
guests/build.sh testworker
args=()
if command -v redis-server >/dev/null; then
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --databases 256 --save "" --appendonly no --dir "$dir" >/dev/null &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null; rm -rf "$dir"' EXIT
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
  args=(--redis "redis://127.0.0.1:$port")
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB"
cargo bench --quiet --bench worker -- "${args[@]}"
