#!/usr/bin/env bash
# What one hostile guest and its clients cost a bystander: a `hello` web type
# on /hello loaded with wrk while the `testbed` guest on / is made to attack
# the host in one way at a time — CPU loops, memory and handle bombs, a log
# flood, an outbound flood, and a client holding 2,000 half-sent requests.
# Prints the bystander's req/s, p99 and errors per attack beside its
# baseline, and the host's RSS and open descriptors at the end of each.
#
#   bench/bystander.sh                 # wrk -t1 -c32 -d10s per attack
#   DURATION=5s bench/bystander.sh
#   CPU=0.5 bench/bystander.sh         # the attacked type under `limits.cpu = 0.5`
#
# Needs wrk and python3. The attackers share the machine's cores with the
# host and wrk, so part of every drop is plain CPU sharing, not leakage.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DURATION=${DURATION:-10s}
CPU=${CPU:-}
CONNECTIONS=${CONNECTIONS:-32}
work=$(mktemp -d)
pids=()
attackers=()
stop_attack() {
  for p in "${attackers[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${attackers[@]}"; do wait "$p" 2>/dev/null || true; done
  attackers=()
}
cleanup() { stop_attack; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "bench/bystander.sh needs wrk: apt-get install -y wrk" >&2; exit 1; }
echo "building wasmproc and the guests ..." >&2
cargo build --quiet --release
guests/build.sh hello testbed
wasmproc="$root/target/release/wasmproc"
guest() { echo "$root/guests/target/wasm32-wasip2/release/$1.wasm"; }

# A local server the outbound flood aims at: it accepts and never answers.
cat >"$work/sink.py" <<'PY'
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4096)
print(s.getsockname()[1], flush=True)
held = []
while True:
    c, _ = s.accept(); held.append(c)
PY
python3 "$work/sink.py" >"$work/sink.port" &
pids+=("$!")
for _ in $(seq 1 100); do [ -s "$work/sink.port" ] && break; sleep 0.05; done
sink_port=$(cat "$work/sink.port")

cat >"$work/formation.toml" <<TOML
[http]
listen = "127.0.0.1:0"

[process.testbed]
kind = "web"
component = "$(guest testbed)"
routes = ["/"]
scale = 8
limits = { memory = "16MiB", timeout = "1s"${CPU:+, cpu = $CPU} }
allow_outbound = ["127.0.0.1:$sink_port"]

[process.hello]
kind = "web"
component = "$(guest hello)"
routes = ["/hello"]
scale = $CONNECTIONS
TOML
"$wasmproc" run --log-level "warn,wasmproc::run=info" --cache-dir "$work/cache" "$work/formation.toml" >"$work/host.log" 2>&1 &
host=$!
pids+=("$host")
addr=""
for _ in $(seq 1 600); do
  addr=$(grep "listening on" "$work/host.log" | grep -o 'http://[0-9.]*:[0-9]*' | head -n1 || true)
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { echo "wasmproc did not start:" >&2; cat "$work/host.log" >&2; exit 1; }
for _ in $(seq 1 600); do curl -sf "$addr/hello" >/dev/null && break; sleep 0.05; done

# loop PATH: requests PATH over and over, in the background.
loop() {
  ( while :; do curl -s -o /dev/null --max-time 5 "$addr$1" || true; done ) &
  attackers+=("$!")
}

# The client: 2,000 connections that each send half a request head and wait.
cat >"$work/slow.py" <<'PY'
import socket, sys, time
host, port = sys.argv[1].removeprefix("http://").split(":")
held = []
for _ in range(2000):
    try:
        c = socket.create_connection((host, int(port)))
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        held.append(c)
    except OSError:
        time.sleep(0.01)
while True:
    time.sleep(1)
PY

measure() { # measure NAME
  local out rps p99 errors rss fds
  sleep 1
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$addr/hello")
  errors=$(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr -s ' ' | tr '\n' ' ' || true)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  rss=$(awk '/VmRSS/ {printf "%.0f MiB", $2/1024}' "/proc/$host/status")
  fds=$(ls "/proc/$host/fd" | wc -l)
  printf '%-40s %10s req/s   p99 %-9s  host RSS %-8s fds %-5s %s\n' "$1" "$rps" "$p99" "$rss" "$fds" "$errors"
  stop_attack
}

echo "machine: $(nproc) cores; bystander: wrk -t1 -c$CONNECTIONS -d$DURATION on /hello; attacked type's limits.cpu: ${CPU:-none}"
measure "no attack (baseline)"
for _ in 1 2 3 4; do loop "/loop"; done
measure "4 clients looping on a CPU-bound guest"
loop "/memory"; loop "/memory"; loop "/fields?n=5000&kib=120"; loop "/streams?n=20000"
measure "4 clients sending memory and handle bombs"
for _ in 1 2; do loop "/flood?n=20000"; done
measure "2 clients asking for 20,000-line log floods"
for _ in 1 2; do loop "/fanout?url=http://127.0.0.1:$sink_port/&n=200"; done
measure "2 clients asking for 200 outbound calls each"
python3 "$work/slow.py" "$addr" &
attackers+=("$!")
sleep 2
measure "2,000 half-sent requests held open"
echo
echo "host log lines about the attacks (first of each kind):"
grep -v "^$" "$work/host.log" | sed -E 's/^[^ ]+ +//' | cut -c1-140 | sort | uniq -c | sort -rn | head -12
