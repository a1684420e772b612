#!/bin/sh
# Builds the JavaScript web type into build/web.wasm with componentize-js,
# installing it first (npm ci) when node_modules lacks it. Does nothing
# when build/web.wasm is newer than every input.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
out=build/web.wasm
if [ ! -x node_modules/.bin/componentize-js ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
fresh=yes
for input in web.js wit/web.wit package-lock.json ../../wit/deps/config/store.wit; do
  [ "$out" -nt "$input" ] || fresh=no
done
[ "$fresh" = yes ] && exit 0

# The world's WIT package and its dependencies: wasmproc's WASI 0.2 WIT,
# labelled 0.2.10 (the version componentize-js 0.23's engine is built
# against: a fetch-event guest must export exactly its incoming-handler),
# and wasi:config.
wit=build/wit
rm -rf "$wit"
mkdir -p "$wit/deps"
cp wit/web.wit "$wit/"
for file in ../../wit/wasi/*.wit; do
  sed 's/0\.2\.12/0.2.10/g' "$file" >"$wit/deps/$(basename "$file")"
done
cp -r ../../wit/deps/config "$wit/deps/"
node_modules/.bin/componentize-js web.js --wit "$wit" --world-name web --out "$out.partial"
mv "$out.partial" "$out"
