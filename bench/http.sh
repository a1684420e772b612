#!/usr/bin/env bash
# HTTP benchmark: the same `hello` component served by wasmproc (fresh instance
# per request, and reuse), by `wasmtime serve` 48 (defaults, and its best pooling
# options), and a native hyper hello, each loaded with wrk on this machine.
# Prints req/s, p99 and peak RSS per server, and the ratios.
#
#   bench/http.sh                # wrk -t2 -c64 -d10s per server
#   DURATION=5s CONNECTIONS=32 bench/http.sh
#
# Needs wrk (apt-get install wrk). Installs wasmtime-cli 48.0.8 with cargo into
# $BENCH_CACHE (default ~/.cache/wasmproc-bench) the first time (~9 minutes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
BENCH_CACHE=${BENCH_CACHE:-$HOME/.cache/wasmproc-bench}
WASMTIME_VERSION=48.0.8
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "bench/http.sh needs wrk: apt-get install -y wrk" >&2; exit 1; }
wasmtime="$BENCH_CACHE/wasmtime-$WASMTIME_VERSION/bin/wasmtime"
if [ ! -x "$wasmtime" ]; then
  echo "installing wasmtime-cli $WASMTIME_VERSION into $BENCH_CACHE (once) ..." >&2
  cargo install --quiet --locked wasmtime-cli --version "$WASMTIME_VERSION" \
    --root "$BENCH_CACHE/wasmtime-$WASMTIME_VERSION"
fi

echo "building wasmproc, the hello guest and the native baseline ..." >&2
cargo build --quiet --release
guests/build.sh hello
cargo build --quiet --release --manifest-path bench/native-hello/Cargo.toml --target-dir target/bench
hello="$root/guests/target/wasm32-wasip2/release/hello.wasm"
wasmproc="$root/target/release/wasmproc"

# start NAME LOG CMD...: runs CMD in the background, waits for its address.
start() {
  local name=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 600); do
    addr=$(grep -v "admin API" "$log" | grep -o 'http://[0-9.]*:[0-9]*' | head -n1 || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { echo "$name did not start:" >&2; cat "$log" >&2; exit 1; }
  # wait until it answers
  for _ in $(seq 1 600); do curl -sf "$addr/" >/dev/null && break; sleep 0.05; done
  server_pid=$pid
}

# measure NAME: loads $addr with wrk; records req/s, p99 and peak RSS of $server_pid.
declare -A RPS P99 RSS
measure() {
  local name=$1 out
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$addr/")
  local errors
  errors=$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)
  RPS[$name]=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  P99[$name]=$(echo "$out" | awk '$1 == "99%" {print $2}')
  RSS[$name]=$(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$server_pid/status")
  printf '%-34s %12s req/s   p99 %-9s  peak RSS %s %s\n' "$name" "${RPS[$name]}" "${P99[$name]}" "${RSS[$name]}" "$errors"
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
}

formation() { # formation REUSE SCALE
  cat >"$work/formation-$1.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[process.web]
kind = "web"
component = "$hello"
scale = $2
reuse = $1
backlog = 4096
TOML
  echo "$work/formation-$1.toml"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; wrk -t$THREADS -c$CONNECTIONS -d$DURATION" 
f1=$(formation 1 "$CONNECTIONS")
"$wasmproc" check --cache-dir "$work/cache" "$f1" >/dev/null   # warm the compile cache
# Only warnings, plus the start-up lines (the bound address) of wasmproc::run.
quiet="warn,wasmproc::run=info"
start wasmproc "$work/wasmproc-fresh.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$f1"
measure "wasmproc (fresh per request)"
fr=$(formation 1000 "$CONNECTIONS")
start wasmproc "$work/wasmproc-reuse.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$fr"
measure "wasmproc (reuse = 1000)"
start wasmtime "$work/wasmtime.log" "$wasmtime" serve -Scli --addr 127.0.0.1:0 "$hello"
measure "wasmtime serve -Scli (defaults)"
start wasmtime "$work/wasmtime-tuned.log" "$wasmtime" serve -Scli --addr 127.0.0.1:0 \
  -O pooling-allocator=y,pooling-memory-keep-resident=1048576,pooling-table-keep-resident=1048576,pooling-pagemap-scan=y \
  "$hello"
measure "wasmtime serve -Scli (tuned pool)"
start native "$work/native.log" "$root/target/bench/release/native-hello" 127.0.0.1:0
measure "native hyper"

ratio() { awk -v a="${RPS[$1]}" -v b="${RPS[$2]}" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "n/a" }'; }
echo
echo "wasmproc fresh / wasmtime serve defaults:   $(ratio 'wasmproc (fresh per request)' 'wasmtime serve -Scli (defaults)')"
echo "wasmproc fresh / wasmtime serve tuned pool: $(ratio 'wasmproc (fresh per request)' 'wasmtime serve -Scli (tuned pool)')"
echo "wasmproc reuse / wasmtime serve defaults:   $(ratio 'wasmproc (reuse = 1000)' 'wasmtime serve -Scli (defaults)')"
echo "wasmproc reuse / native hyper:              $(ratio 'wasmproc (reuse = 1000)' 'native hyper')"
