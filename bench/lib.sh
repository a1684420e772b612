# Shared by the bench scripts: source it after `cd "$root"`.

# median: the median of the numbers on stdin (space or newline separated).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# served_at LOG: the first http://IP:PORT in a server's LOG that is where it
# serves HTTP — not wasmproc's admin API or dashboard line (wasmtime serve
# logs only the one address).
served_at() { grep -v "admin API\|dashboard" "$1" | grep -o 'http://[0-9.]*:[0-9]*' | head -n1 || true; }

# start NAME LOG CMD...: runs CMD in the background (its pid joins the
# caller's `pids`, for its cleanup), waits until it serves HTTP, and sets
# `addr` and `server_pid`. The log is removed first: a log left by an earlier
# server would give its address before the new one has truncated it.
start() {
  local name=$1 log=$2; shift 2
  rm -f "$log"
  "$@" >"$log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  addr=""
  for _ in $(seq 1 600); do
    [ -f "$log" ] && addr=$(served_at "$log")
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { echo "$name did not start:" >&2; cat "$log" >&2; exit 1; }
  for _ in $(seq 1 600); do curl -sf -o /dev/null "$addr/" && return; sleep 0.05; done
  echo "$name does not answer at $addr:" >&2; cat "$log" >&2; exit 1
}
