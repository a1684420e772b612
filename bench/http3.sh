#!/usr/bin/env bash
# HTTP benchmark of WASI 0.3: the same `hello3` component (a `wasi:http/service`)
# served by wasmproc — a fresh instance per request, reuse, and one instance
# per core serving up to 64 requests at once (`concurrency = 64`) — and by
# `wasmtime serve -Sp3` 48 with its defaults (instances reused up to 128 times,
# 16 requests at once each) and with a fresh instance per request
# (`--max-instance-reuse-count 1`, the like-for-like twin of wasmproc's
# default). The servers take turns for ROUNDS rounds; the ratios are of
# medians.
#
#   bench/http3.sh               # 5 rounds of wrk -t2 -c64 -d10s per server
#   ROUNDS=3 DURATION=5s bench/http3.sh
#
# Needs wrk. Installs wasmtime-cli 48.0.8 with cargo into $BENCH_CACHE (default
# ~/.cache/wasmproc-bench) the first time (~9 minutes), as bench/http.sh does.
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

command -v wrk >/dev/null || { echo "bench/http3.sh needs wrk: apt-get install -y wrk" >&2; exit 1; }
wasmtime="$BENCH_CACHE/wasmtime-$WASMTIME_VERSION/bin/wasmtime"
if [ ! -x "$wasmtime" ]; then
  echo "installing wasmtime-cli $WASMTIME_VERSION into $BENCH_CACHE (once) ..." >&2
  cargo install --quiet --locked wasmtime-cli --version "$WASMTIME_VERSION" \
    --root "$BENCH_CACHE/wasmtime-$WASMTIME_VERSION"
fi

echo "building wasmproc and the hello3 guest ..." >&2
cargo build --quiet --release
guests/build.sh hello3
hello="$root/guests/target/wasm32-wasip2/release/hello3.wasm"
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

formation() { # formation NAME REUSE SCALE CONCURRENCY
  cat >"$work/formation-$1.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[process.web]
kind = "web"
component = "$hello"
scale = $3
reuse = $2
concurrency = $4
backlog = 4096
TOML
  echo "$work/formation-$1.toml"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $ROUNDS rounds"
ff=$(formation fresh 1 "$CONNECTIONS" 1)
fr=$(formation reuse 1000 "$CONNECTIONS" 1)
fc=$(formation shared 1000 "$(nproc)" 64)
"$wasmproc" check --cache-dir "$work/cache" "$ff" >/dev/null   # warm the compile cache
quiet="warn,wasmproc::run=info"
FRESH="wasmproc 0.3 (fresh per request)"
REUSE="wasmproc 0.3 (reuse = 1000)"
SHARED="wasmproc 0.3 (concurrency = 64)"
DEFAULTS="wasmtime serve -Sp3 (defaults)"
WFRESH="wasmtime serve -Sp3 (fresh per request)"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  start wasmproc "$work/fresh.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$ff"
  measure "$FRESH"
  start wasmproc "$work/reuse.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$fr"
  measure "$REUSE"
  start wasmproc "$work/shared.log" "$wasmproc" run --log-level "$quiet" --cache-dir "$work/cache" "$fc"
  measure "$SHARED"
  start wasmtime "$work/wasmtime.log" "$wasmtime" serve -Sp3 -Scli --addr 127.0.0.1:0 "$hello"
  measure "$DEFAULTS"
  start wasmtime "$work/wasmtime-fresh.log" "$wasmtime" serve -Sp3 -Scli --addr 127.0.0.1:0 \
    --max-instance-reuse-count 1 "$hello"
  measure "$WFRESH"
done

declare -A MED
echo
echo "medians of $ROUNDS rounds:"
for name in "$FRESH" "$REUSE" "$SHARED" "$DEFAULTS" "$WFRESH"; do
  MED[$name]=$(echo "${RPS[$name]}" | median)
  printf '%-34s %12s req/s   p99 %s\n' "$name" "${MED[$name]}" "$(echo "${P99[$name]}" | tr ' ' '\n' | grep -v '^$' | tr '\n' ' ')"
done
ratio() {
  awk -v a="${MED[$1]}" -v b="${MED[$2]}" 'BEGIN { if (b <= 0) { print "n/a"; exit } printf "%.2f×\n", a / b }'
}
echo
echo "wasmproc 0.3 fresh / wasmtime serve -Sp3 fresh:          $(ratio "$FRESH" "$WFRESH")"
echo "wasmproc 0.3 fresh / wasmtime serve -Sp3 defaults:       $(ratio "$FRESH" "$DEFAULTS")"
echo "wasmproc 0.3 reuse / wasmtime serve -Sp3 defaults:       $(ratio "$REUSE" "$DEFAULTS")"
echo "wasmproc 0.3 concurrency 64 / wasmtime serve -Sp3:       $(ratio "$SHARED" "$DEFAULTS")"
