#!/usr/bin/env bash
# Run-time control figures: time to scale a web type from 1 to 1,000 live
# instances (reuse mode, each instance created ahead) and back, and the
# latency of a deploy swap (compile + check + swap, until the new version
# answers). Not a test: prints figures.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
N=${N:-1000}
cargo build --quiet --release
guests/build.sh hello testbed
wasmproc="$root/target/release/wasmproc"
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/formation.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[pool]
capacity = $((N * 2))
[process.web]
kind = "web"
component = "$root/guests/target/wasm32-wasip2/release/hello.wasm"
scale = 1
reuse = 1000
limits = { memory = "4MiB" }
TOML
"$wasmproc" run --cache-dir "$work/cache" "$work/formation.toml" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do grep -q "ready:" "$work/log" && break; sleep 0.05; done
addr=$(grep -o 'listening on http://[0-9.:]*' "$work/log" | cut -d/ -f3)
ms() { date +%s%3N; }
rss() { awk '/VmRSS/ {printf "%.0f MiB", $2/1024}' /proc/$pid/status; }
echo "machine: $(nproc) cores; RSS at scale 1: $(rss)"

t0=$(ms)
"$wasmproc" scale -f "$work/formation.toml" web=$N >/dev/null
for _ in $(seq 1 3000); do grep -q "$N \`web\` instances live\|$((N - 1)) \`web\` instances live" "$work/log" && break; sleep 0.01; done
t1=$(ms)
echo "scale 1 → $N live instances: $((t1 - t0)) ms end to end ($(grep -o "[0-9]* \`web\` instances live in [0-9]* ms" "$work/log" | tail -1)); RSS $(rss)"
t0=$(ms)
"$wasmproc" scale -f "$work/formation.toml" web=1 >/dev/null
t1=$(ms)
echo "scale $N → 1: $((t1 - t0)) ms (idle instances dropped at once); RSS $(rss)"

curl -sf "http://$addr/" >/dev/null
t0=$(ms)
"$wasmproc" deploy -f "$work/formation.toml" web "$root/guests/target/wasm32-wasip2/release/testbed.wasm" >/dev/null
t1=$(ms)
until [ "$(curl -s "http://$addr/")" = "testbed ok" ]; do sleep 0.001; done
t2=$(ms)
echo "deploy (compile + check + swap, new artifact): $((t1 - t0)) ms; new version answering after $((t2 - t0)) ms"
