#!/bin/sh
# Builds guest components for wasm32-wasip2 into guests/target/wasm32-wasip2/release/.
# Usage: guests/build.sh [CRATE ...]   (no crate: all of them)
# Installs the wasm32-wasip2 target first when rustup manages the toolchain.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if command -v rustup >/dev/null 2>&1 \
  && ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
set --  $(for crate in "$@"; do printf -- '-p %s ' "$crate"; done)
exec cargo build --quiet --release --target wasm32-wasip2 \
  --manifest-path "$here/Cargo.toml" --target-dir "$here/target" "$@"
