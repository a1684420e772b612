#!/usr/bin/env bash
# Density: N live instances (default 100,000) of the testbed component in one
# wasmproc process. Reports time to scale 1 → N (instances created ahead,
# reuse mode), RSS, address space, and a sample of responses naming the
# instances that answered (concurrent requests land on distinct instances).
# Not a test: prints figures.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
N=${N:-100000}
SAMPLE=${SAMPLE:-1000}
# Each live instance takes ~10 memory mappings; Linux allows 65,530 by default.
need=$((N * 10 + 10000))
if [ "$(cat /proc/sys/vm/max_map_count)" -lt "$need" ]; then
  echo "raising vm.max_map_count to $need (needs root) ..." >&2
  sysctl -q -w vm.max_map_count="$need" || { echo "cannot: run as root, or lower N" >&2; exit 1; }
fi
cargo build --quiet --release
guests/build.sh testbed
wasmproc="$root/target/release/wasmproc"
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/formation.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[pool]
capacity = $N
[process.web]
kind = "web"
component = "$root/guests/target/wasm32-wasip2/release/testbed.wasm"
scale = 1
reuse = 1000000
backlog = $SAMPLE
limits = { memory = "2MiB" }
TOML
"$wasmproc" run --cache-dir "$work/cache" "$work/formation.toml" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do grep -q "ready:\|error" "$work/log" && break; sleep 0.05; done
grep -q "ready:" "$work/log" || { cat "$work/log"; exit 1; }
addr=$(grep -o 'listening on http://[0-9.:]*' "$work/log" | cut -d/ -f3)
status() { awk '/VmRSS|VmSize/ {printf "%s %.2f GiB  ", $1, $2/1048576}' /proc/$pid/status; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; at scale 1: $(status)"
ms() { date +%s%3N; }
t0=$(ms)
"$wasmproc" scale -f "$work/formation.toml" web=$N >/dev/null
until grep -q "$((N - 1)) \`web\` instances live in" "$work/log"; do sleep 0.05; done
t1=$(ms)
echo "scale 1 → $N: $((t1 - t0)) ms ($(grep -o "[0-9]* \`web\` instances live in [0-9]* ms" "$work/log" | tail -1))"
echo "at scale $N: $(status)"
rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
echo "target: $N live instances under 4 GiB RSS, scaled in under 10 s: $(( rss_kib / 1024 )) MiB, $((t1 - t0)) ms, $([ "$rss_kib" -lt $((4 << 20)) ] && [ $((t1 - t0)) -lt 10000 ] && echo met || echo "not met")"
"$wasmproc" ps -f "$work/formation.toml"
python3 - "$addr" "$SAMPLE" <<'PY'
import sys, threading, urllib.request
addr, n = sys.argv[1], int(sys.argv[2])
names, errors = set(), []
lock = threading.Lock()
def hit():
    try:
        body = urllib.request.urlopen(f"http://{addr}/whoami?ms=2000", timeout=60).read().decode().strip()
        with lock: names.add(body)
    except Exception as e:
        with lock: errors.append(str(e))
threads = [threading.Thread(target=hit) for _ in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
print(f"sample: {n} concurrent requests (each holding its instance 2s), {len(errors)} failed{' (' + errors[0] + ')' if errors else ''}, answered by {len(names)} distinct instances (e.g. {sorted(names)[:3]})")
PY
