#!/usr/bin/env bash
# Instructions per request: the hello component served with `reuse = 1000`
# (or REUSE=1 for a fresh instance per request) under callgrind, loaded with
# wrk; prints the server's user-space instructions per request, and where
# they go by crate. Unlike req/s, the count does not drift with the machine,
# so it shows the effect of a change that timing noise would hide.
#
#   bench/instructions.sh
#   REUSE=1 DURATION=10s bench/instructions.sh
#
# Needs valgrind and wrk (apt-get install -y valgrind wrk). The pool uses the
# dense memory layout (valgrind cannot reserve 4 GiB per memory), so the
# guest's code keeps its bounds checks; the host's share is unaffected.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
REUSE=${REUSE:-1000}
DURATION=${DURATION:-10s}
for tool in valgrind callgrind_control callgrind_annotate wrk; do
  command -v "$tool" >/dev/null || { echo "bench/instructions.sh needs $tool: apt-get install -y valgrind wrk" >&2; exit 1; }
done
cargo build --quiet --release
guests/build.sh hello
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/formation.toml" <<TOML
[http]
listen = "127.0.0.1:$port"
[pool]
capacity = 4200   # past the fast layout's address budget: dense memories
[process.web]
kind = "web"
component = "$root/guests/target/wasm32-wasip2/release/hello.wasm"
scale = 64
reuse = $REUSE
backlog = 4096
limits = { memory = "2MiB" }
TOML
"$root/target/release/wasmproc" check --cache-dir "$work/cache" "$work/formation.toml" >/dev/null
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" --smc-check=all-non-file \
  "$root/target/release/wasmproc" run --log-level warn --cache-dir "$work/cache" "$work/formation.toml" \
  >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
wrk -t1 -c8 -d3s "http://127.0.0.1:$port/" >/dev/null       # warm up, then count from zero
callgrind_control -z "$pid" >/dev/null 2>&1
wrk -t1 -c8 -d"$DURATION" "http://127.0.0.1:$port/" >"$work/wrk.txt"
callgrind_control -d "$pid" >/dev/null 2>&1
kill "$pid"; wait "$pid" 2>/dev/null || true
pid=
requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
dump=$(ls -S "$work"/callgrind.out* | head -n1)
callgrind_annotate --auto=no --threshold=100 "$dump" | python3 -c '
import re, sys, collections
requests = int(sys.argv[1])
CRATES = ["wasmtime_wasi_http", "wasmtime_wasi_io", "wasmtime_wasi", "wasmtime_environ",
          "wasmtime_internal_\\w+", "wasmtime", "cranelift_\\w+", "hyper_util", "hyper", "httparse",
          "http_body_util", "http", "tokio", "mio", "bytes", "wasmproc", "prometheus_client"]
by_part = collections.Counter()
started = False
for line in sys.stdin:
    if "file:function" in line:
        started = True
        continue
    m = re.match(r"\s*([\d,]+) \(", line)
    if not started or not m:
        continue
    n = int(m.group(1).replace(",", ""))
    entry = line[m.end():].split(")", 1)[1].strip()
    source, _, function = entry.partition(":")
    function = function.split(" [")[0]
    crate = re.search(r"/registry/src/[^/]+/([A-Za-z_\-]+?)-\d", source)
    named = re.search(r"\b(" + "|".join(CRATES) + r")::", function)
    if "malloc" in entry:
        part = "allocator"
    elif re.search(r"mem(cpy|move|set)", entry):
        part = "memcpy/memset"
    elif source == "???" and function.startswith("0x"):
        part = "guest code and trampolines (JIT)"
    elif crate:
        part = crate.group(1).replace("-", "_")
    elif named:
        part = named.group(1)
    else:
        part = "other"
    by_part[part] += n
total = sum(by_part.values())
print(f"{total // requests} user-space instructions per request ({requests} requests)")
for part, n in by_part.most_common(12):
    print(f"  {n // requests:>7}  {100 * n / total:5.1f}%  {part}")
' "$requests"
