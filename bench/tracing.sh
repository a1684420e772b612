#!/usr/bin/env bash
# What tracing costs: the `hello` component served by wasmproc (fresh
# instance per request, and reuse) with tracing off, on with every request
# sampled, and on with 1% sampled (parentbased_traceidratio), exported over
# OTLP/HTTP to a local sink that answers 200. The two take turns for ROUNDS rounds; the ratios are of
# medians.
#
#   bench/tracing.sh                # 5 rounds of wrk -t2 -c64 -d10s each
#   ROUNDS=3 DURATION=5s bench/tracing.sh
#
# Needs wrk (apt-get install wrk) and python3.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source "$root/bench/lib.sh"
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-5}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "bench/tracing.sh needs wrk: apt-get install -y wrk" >&2; exit 1; }
echo "building wasmproc and the hello guest ..." >&2
cargo build --quiet --release
guests/build.sh hello
hello="$root/guests/target/wasm32-wasip2/release/hello.wasm"
wasmproc="$root/target/release/wasmproc"

# The OTLP sink: answers every export 200 (an empty ExportTraceServiceResponse).
cat >"$work/sink.py" <<'PY'
import http.server
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
PY
python3 "$work/sink.py" >"$work/sink.addr" &
pids+=("$!")
for _ in $(seq 1 100); do [ -s "$work/sink.addr" ] && break; sleep 0.05; done
sink=$(cat "$work/sink.addr")

serve() { # serve LOG ENV...: runs wasmproc with $formation and ENV (see `start`)
  local log=$1; shift
  start wasmproc "$log" env "$@" "$wasmproc" run --log-level "warn,wasmproc::run=info" \
    --cache-dir "$work/cache" "$formation"
}

declare -A RPS
measure() { # measure NAME
  local out rps p99 errors
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$addr/")
  errors=$(echo "$out" | grep -E 'Non-2xx|Socket errors' || true)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  RPS[$1]="${RPS[$1]:-} $rps"
  printf '%-36s %12s req/s   p99 %-9s %s\n' "$1" "$rps" "$p99" "$errors"
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
}

formation() { # formation REUSE
  cat >"$work/formation-$1.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[process.web]
kind = "web"
component = "$hello"
scale = $CONNECTIONS
reuse = $1
backlog = 4096
TOML
  echo "$work/formation-$1.toml"
}

echo "machine: $(nproc) cores; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $ROUNDS rounds; OTLP sink at $sink"
fresh=$(formation 1)
reuse=$(formation 1000)
"$wasmproc" check --cache-dir "$work/cache" "$fresh" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  for kind in fresh reuse; do
    formation=${!kind}
    serve "$work/off.log" OTEL_SDK_DISABLED=false
    measure "$kind, tracing off"
    serve "$work/on.log" OTEL_EXPORTER_OTLP_ENDPOINT="$sink"
    measure "$kind, tracing on (every request)"
    serve "$work/sampled.log" OTEL_EXPORTER_OTLP_ENDPOINT="$sink" \
      OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
    measure "$kind, tracing on (1% sampled)"
  done
done

echo
echo "medians of $ROUNDS rounds:"
for kind in fresh reuse; do
  off=$(echo "${RPS[$kind, tracing off]}" | median)
  on=$(echo "${RPS[$kind, tracing on (every request)]}" | median)
  sampled=$(echo "${RPS[$kind, tracing on (1% sampled)]}" | median)
  awk -v k="$kind" -v off="$off" -v on="$on" -v s="$sampled" 'BEGIN {
    printf "%-6s off %8.0f req/s   on %8.0f (%.2f×)   1%% sampled %8.0f (%.2f×)\n", k, off, on, on / off, s, s / off }'
done
