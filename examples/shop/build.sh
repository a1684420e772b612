#!/bin/sh
# Builds the shop example's three components (one crate, one feature each).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
guests="$here/../../guests"
"$guests/build.sh" wasmproc-guest
mkdir -p "$here/components"
for part in web mailer report; do
  cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$guests/Cargo.toml" \
    --target-dir "$guests/target/shop-$part" -p shop --features "$part"
  cp "$guests/target/shop-$part/wasm32-wasip2/release/shop.wasm" "$here/components/$part.wasm"
done
