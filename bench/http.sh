#!/usr/bin/env bash
# HTTP benchmark: the same `hello` component served by wasmproc (fresh instance
# per request, and reuse), by `wasmtime serve` 48 (defaults, and its best pooling
# options), and a native hyper hello, each loaded with wrk on this machine.
# The servers take turns for ROUNDS rounds, so drift in the machine's speed
# (a shared VM's neighbours) hits them all alike; the ratios are of medians.
# Prints req/s, p99 and peak RSS per server and round, the medians, the
# ratios against the targets, and the cost of one instance without the
# network (bench/instance.rs).
#
#   bench/http.sh                # 5 rounds of wrk -t2 -c64 -d10s per server
#   ROUNDS=5 DURATION=5s CONNECTIONS=32 bench/http.sh
#
# Needs wrk (apt-get install wrk). Installs wasmtime-cli 48.0.8 with cargo into
# $BENCH_CACHE (default ~/.cache/wasmproc-bench) the first time (~9 minutes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source "$root/bench/lib.sh"
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-5}
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

# measure NAME: loads $addr with wrk; records req/s, p99 and peak RSS of $server_pid.
declare -A RPS P99
measure() {
  local name=$1 out errors rps p99 rss
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$addr/")
  errors=$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  rss=$(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$server_pid/status")
  RPS[$name]="${RPS[$name]:-} $rps"
  P99[$name]="${P99[$name]:-} $p99"
  printf '%-34s %12s req/s   p99 %-9s  peak RSS %s %s\n' "$name" "$rps" "$p99" "$rss" "$errors"
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

echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $ROUNDS rounds"
f1=$(formation 1 "$CONNECTIONS")
fr=$(formation 1000 "$CONNECTIONS")
"$wasmproc" check --cache-dir "$work/cache" "$f1" >/dev/null   # warm the compile cache
# Only warnings, plus the start-up lines (the bound address) of wasmproc::run.
quiet="warn,wasmproc::run=info"
FRESH="wasmproc (fresh per request)"
REUSE="wasmproc (reuse = 1000)"
DEFAULTS="wasmtime serve -Scli (defaults)"
TUNED="wasmtime serve -Scli (tuned pool)"
NATIVE="native hyper"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  start wasmproc "$work/wasmproc-fresh.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$f1"
  measure "$FRESH"
  start wasmproc "$work/wasmproc-reuse.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$fr"
  measure "$REUSE"
  start wasmtime "$work/wasmtime.log" "$wasmtime" serve -Scli --addr 127.0.0.1:0 "$hello"
  measure "$DEFAULTS"
  start wasmtime "$work/wasmtime-tuned.log" "$wasmtime" serve -Scli --addr 127.0.0.1:0 \
    -O pooling-allocator=y,pooling-memory-keep-resident=1048576,pooling-table-keep-resident=1048576,pooling-pagemap-scan=y \
    "$hello"
  measure "$TUNED"
  start native "$work/native.log" "$root/target/bench/release/native-hello" 127.0.0.1:0
  measure "$NATIVE"
done

declare -A MED
echo
echo "medians of $ROUNDS rounds:"
for name in "$FRESH" "$REUSE" "$DEFAULTS" "$TUNED" "$NATIVE"; do
  MED[$name]=$(echo "${RPS[$name]}" | median)
  printf '%-34s %12s req/s   p99 %s\n' "$name" "${MED[$name]}" "$(echo "${P99[$name]}" | tr ' ' '\n' | grep -v '^$' | tr '\n' ' ')"
done
# ratio A B TARGET: prints A/B and whether it reaches TARGET.
ratio() {
  awk -v a="${MED[$1]}" -v b="${MED[$2]}" -v t="$3" 'BEGIN {
    if (b <= 0) { print "n/a"; exit }
    r = a / b; printf "%.2f× (target ≥ %s×: %s)\n", r, t, (r >= t ? "met" : "not met") }'
}
echo
echo "wasmproc fresh / wasmtime serve defaults:   $(ratio "$FRESH" "$DEFAULTS" 2)"
echo "wasmproc fresh / wasmtime serve tuned pool: $(ratio "$FRESH" "$TUNED" 1.2)"
echo "wasmproc reuse / wasmtime serve defaults:   $(ratio "$REUSE" "$DEFAULTS" 5)"
echo "wasmproc reuse / native hyper:              $(ratio "$REUSE" "$NATIVE" 0.25)"
echo
echo "one instance, no network (one thread; bench/instance.rs):"
cargo bench --quiet --bench instance
