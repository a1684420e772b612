#!/usr/bin/env bash
# `wasmproc dev`: time from saving a source file to the first request that
# gets the new answer, for a Rust guest (a copy of guests/hello as a crate
# of its own) and a JavaScript guest (a copy of examples/javascript). Each
# guest is edited ROUNDS times; requests run meanwhile, one after another,
# and the failed ones are counted (there should be none).
#
#   bench/dev.sh              # 3 edits per guest
#   ROUNDS=5 bench/dev.sh
#
# Needs the wasm32-wasip2 Rust target, Node.js 20 and npm.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

echo "building wasmproc and the JavaScript example ..." >&2
cargo build --quiet --release
examples/javascript/build.sh
wasmproc="$root/target/release/wasmproc"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }

# The Rust guest: guests/hello as a crate of its own.
rust="$work/rust"
mkdir -p "$rust/src"
cp guests/hello/src/lib.rs "$rust/src/"
cat >"$rust/Cargo.toml" <<TOML
[package]
name = "hello"
version = "0.1.0"
edition = "2024"
[lib]
crate-type = ["cdylib"]
[dependencies]
wasip2 = "1"
[profile.release]
opt-level = "s"
strip = true
TOML
rust_port=$(port)
cat >"$rust/formation.toml" <<TOML
[http]
listen = "127.0.0.1:$rust_port"
[process.web]
kind = "web"
component = "target/wasm32-wasip2/release/hello.wasm"
build = "cargo build --quiet --release --target wasm32-wasip2"
TOML

# The JavaScript guest: examples/javascript beside a link to wit/.
js="$work/examples/javascript"
mkdir -p "$js/wit"
cp examples/javascript/{formation.toml,build.sh,web.js,package.json,package-lock.json} "$js/"
cp examples/javascript/wit/web.wit "$js/wit/"
ln -s "$root/examples/javascript/node_modules" "$js/node_modules"
ln -s "$root/wit" "$work/wit"
js_port=$(port)

# edit NAME DIR FILE FROM PORT ENVIRONMENT...: runs `wasmproc dev` in DIR,
# then ROUNDS times replaces the greeting FROM in FILE and times the new answer.
edit() {
  local name=$1 dir=$2 file=$3 from=$4 port=$5; shift 5
  local log="$work/$name.log" answer
  env "$@" "$wasmproc" dev --cache-dir "$work/cache" "$dir/formation.toml" >"$log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 6000); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/" && break
    kill -0 "$pid" || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  grep -q "watching" "$log" || sleep 1
  for round in $(seq 1 "$ROUNDS"); do
    local to="$from, edit $round" requests=0 failed=0 t0 elapsed
    sed -i "s/$from[^\"']*/$to/" "$dir/$file"
    t0=$(ms)
    while :; do
      answer=$(curl -s -w ' %{http_code}' "http://127.0.0.1:$port/" || true)
      requests=$((requests + 1))
      [ "${answer##* }" = 200 ] || failed=$((failed + 1))
      [[ "$answer" == *"edit $round"* ]] && break
      (( $(ms) - t0 < 600000 )) || { echo "$name: no new answer in 10 minutes" >&2; cat "$log" >&2; exit 1; }
    done
    elapsed=$(( $(ms) - t0 ))
    echo "$name edit $round: new answer $elapsed ms after the save ($requests requests meanwhile, $failed failed)"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "machine: $(nproc) cores; $ROUNDS edits per guest"
edit rust "$rust" src/lib.rs "from wasmproc" "$rust_port"
edit javascript "$js" web.js "Hello from JavaScript" "$js_port" PORT="$js_port"
