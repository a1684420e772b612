#!/usr/bin/env bash
# JavaScript and Python web guests (examples/javascript, examples/python),
# served by wasmproc and by `wasmtime serve` 48, side by side. For each
# language it prints:
# - the component's size and a cold compile (`wasmproc check`, empty cache);
# - start-up: exec to the first 200, three times: wasmproc with a warm
#   compile cache, and `wasmtime serve` with its own compile cache (on by
#   default; cold the first time it sees a component);
# - memory per instance: the host's RSS with SCALE requests in flight at once
#   (each in its own instance, `/echo` of a slow upload) minus its RSS idle,
#   divided by SCALE;
# - req/s and p99 of `GET /` under wrk, the servers taking turns for ROUNDS
#   rounds (medians): wasmproc with a fresh instance per request, wasmproc
#   with `reuse = 100` (Python; a fetch-event JavaScript guest serves one
#   request per instance), and `wasmtime serve -Scli -Sconfig`.
#
#   bench/languages.sh                 # 3 rounds of wrk -t2 -c16 -d10s
#   ROUNDS=5 DURATION=5s bench/languages.sh
#
# Needs wrk, Node.js 20 with npm and Python 3.10+ (the examples' build.sh
# install componentize-js and componentize-py). Installs wasmtime-cli 48.0.8
# like bench/http.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source "$root/bench/lib.sh"
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-32}
BENCH_CACHE=${BENCH_CACHE:-$HOME/.cache/wasmproc-bench}
WASMTIME_VERSION=48.0.8
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "bench/languages.sh needs wrk: apt-get install -y wrk" >&2; exit 1; }
wasmtime="$BENCH_CACHE/wasmtime-$WASMTIME_VERSION/bin/wasmtime"
if [ ! -x "$wasmtime" ]; then
  echo "installing wasmtime-cli $WASMTIME_VERSION into $BENCH_CACHE (once) ..." >&2
  cargo install --quiet --locked wasmtime-cli --version "$WASMTIME_VERSION" \
    --root "$BENCH_CACHE/wasmtime-$WASMTIME_VERSION"
fi

echo "building wasmproc and the examples ..." >&2
cargo build --quiet --release
examples/javascript/build.sh
examples/python/build.sh
wasmproc="$root/target/release/wasmproc"
js="$root/examples/javascript/build/web.wasm"
# The Python web type imports wasmproc's queue, which `wasmtime serve`
# lacks: both servers run the same web.py built for a world without it.
py="$work/python-web.wasm"
mkdir -p "$work/pywit"
cat >"$work/pywit/bench.wit" <<'WIT'
package bench:python;
world web {
  include wasi:http/proxy@0.2.12;
  import wasi:config/store@0.2.0-rc.1;
}
WIT
examples/python/.venv/bin/componentize-py --quiet -d examples/python/build/wit -d "$work/pywit" \
  -w bench:python/web componentize web -p examples/python/web -o "$py"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }

formation() { # formation NAME COMPONENT REUSE SCALE PORT
  cat >"$work/$1.toml" <<TOML
[http]
listen = "127.0.0.1:$5"
[process.web]
kind = "web"
component = "$2"
scale = $4
reuse = $3
backlog = 4096
limits = { memory = "64MiB", timeout = "30s" }
env = { GREETING = "Hello" }
config = { greeting = "from the bench" }
TOML
  echo "$work/$1.toml"
}

# serve NAME LOG CMD...: starts CMD, waits for its first 200 on $addr;
# sets $server_pid and $first_ms (exec to first 200).
serve() {
  local name=$1 log=$2 t0; shift 2
  t0=$(ms)
  "$@" >"$log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 1 1200); do
    curl -sf -o /dev/null "$addr/" && break
    kill -0 "$server_pid" 2>/dev/null || { echo "$name exited:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.02
  done
  curl -sf -o /dev/null "$addr/" || { echo "$name did not answer:" >&2; cat "$log" >&2; exit 1; }
  first_ms=$(( $(ms) - t0 ))
}
stop() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$server_pid/status"; }

# per_instance: RSS with $SCALE slow uploads in flight, minus RSS idle, / $SCALE.
per_instance() {
  local idle busy upload
  idle=$(rss_kib)
  upload=()
  for _ in $(seq 1 "$SCALE"); do
    # 64 KiB at 16 KiB/s: each upload holds its instance for ~4 s.
    head -c 65536 /dev/zero | curl -s -o /dev/null --limit-rate 16k --data-binary @- "$addr/echo" &
    upload+=($!)
  done
  sleep 2
  busy=$(rss_kib)
  wait "${upload[@]}" 2>/dev/null || true
  awk -v i="$idle" -v b="$busy" -v n="$SCALE" 'BEGIN { printf "%.1f MiB (idle %.0f MiB, %d in flight %.0f MiB)", (b - i) / n / 1024, i / 1024, n, b / 1024 }'
}

declare -A RPS P99
load() { # load NAME
  local out rps p99 errors
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$addr/")
  errors=$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  RPS[$1]="${RPS[$1]:-} $rps"
  P99[$1]="${P99[$1]:-} $p99"
  printf '  %-36s %10s req/s   p99 %-9s %s\n' "$1" "$rps" "$p99" "$errors"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $ROUNDS rounds"
for lang in javascript python; do
  case $lang in
    javascript) component=$js ;;
    python) component=$py ;;
  esac
  echo
  echo "== $lang: $(awk -v b="$(stat -c %s "$component")" 'BEGIN { printf "%.1f MiB", b / 1048576 }') component"
  p=$(port)
  addr="http://127.0.0.1:$p"
  fresh=$(formation "$lang-fresh" "$component" 1 "$SCALE" "$p")
  warm=$(formation "$lang-reuse" "$component" 100 "$SCALE" "$p")
  compile=$("$wasmproc" check --cache-dir "$work/cache-$lang" "$fresh" 2>&1 | grep -o 'compiled in [0-9]* ms' || true)
  echo "cold compile (wasmproc check, empty cache): ${compile#compiled in }"
  for run in 1 2 3; do
    serve wasmproc "$work/$lang-start.log" "$wasmproc" run --log-level warn --cache-dir "$work/cache-$lang" "$fresh"
    wasmproc_first=$first_ms
    [ "$run" = 1 ] && echo "memory per busy instance (wasmproc, $SCALE in flight): $(per_instance)"
    stop
    serve wasmtime "$work/$lang-wasmtime-start.log" "$wasmtime" serve -Scli -Sconfig \
      -Sconfig-var=greeting=bench --env GREETING=Hello --addr "127.0.0.1:$p" "$component"
    echo "start-up run $run: first 200 after $wasmproc_first ms (wasmproc, warm cache), $first_ms ms (wasmtime serve)"
    stop
  done
  for round in $(seq 1 "$ROUNDS"); do
    echo " round $round"
    serve wasmproc "$work/$lang-fresh.log" "$wasmproc" run --log-level warn --cache-dir "$work/cache-$lang" "$fresh"
    load "$lang: wasmproc (fresh per request)"
    stop
    if [ "$lang" = python ]; then
      serve wasmproc "$work/$lang-reuse.log" "$wasmproc" run --log-level warn --cache-dir "$work/cache-$lang" "$warm"
      load "$lang: wasmproc (reuse = 100)"
      stop
    fi
    serve wasmtime "$work/$lang-wasmtime.log" "$wasmtime" serve -Scli -Sconfig \
      -Sconfig-var=greeting=bench --env GREETING=Hello --addr "127.0.0.1:$p" "$component"
    load "$lang: wasmtime serve -Scli"
    stop
  done
done

echo
echo "medians of $ROUNDS rounds:"
for name in "${!RPS[@]}"; do
  printf '%-38s %10s req/s   p99 %s\n' "$name" "$(echo "${RPS[$name]}" | median)" "$(echo "${P99[$name]}" | tr ' ' '\n' | grep -v '^$' | tr '\n' ' ')"
done | sort
