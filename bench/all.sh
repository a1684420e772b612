#!/usr/bin/env bash
# Every performance figure of issue #5 in one run: HTTP against `wasmtime serve`
# and native hyper (bench/http.sh), worker throughput (bench/worker.sh),
# start-up (bench/startup.sh) and density (bench/density.sh, which raises
# vm.max_map_count and so needs root). Prints each script's figures, then
# one line per target. Takes about 13 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for script in http worker startup density; do
  echo "== bench/$script.sh"
  "$root/bench/$script.sh" 2>&1 | tee -a "$log"
  echo
done
echo "== targets"
grep -E 'target' "$log"
