#!/bin/sh
# Builds the Python web and worker types into build/ with componentize-py,
# installing it first (into .venv, from requirements.txt) when missing.
# A component newer than every input of it is left as it is.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
if [ ! -x .venv/bin/componentize-py ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi
componentize_py=.venv/bin/componentize-py

# The WIT the components are built against: wasmproc's own package and
# the WASI 0.2 and wasi:config WIT it provides.
wit=build/wit
if [ ! -d "$wit" ] || [ "$wit" -ot ../../wit/wasmproc.wit ]; then
  rm -rf "$wit"
  mkdir -p "$wit/deps"
  cp ../../wit/wasmproc.wit "$wit/"
  cp ../../wit/wasi/*.wit "$wit/deps/"
  cp -r ../../wit/deps/config "$wit/deps/"
fi

# build NAME INPUT... -- COMPONENTIZE-PY ARGS...
build() {
  out=build/$1.wasm
  shift
  fresh=yes
  while [ "$1" != -- ]; do
    [ "$out" -nt "$1" ] || fresh=no
    shift
  done
  shift
  [ "$fresh" = yes ] && return 0
  "$componentize_py" --quiet "$@" -o "$out.partial"
  mv "$out.partial" "$out"
}
build web web/web.py wit/web.wit requirements.txt ../../wit/wasmproc.wit -- \
  -d "$wit" -d wit -w example:python/web componentize web -p web
build worker worker/worker.py requirements.txt ../../wit/wasmproc.wit -- \
  -d "$wit" -w wasmproc:host/worker componentize worker -p worker
