# Shared by the bench scripts: source it after `cd "$root"`.

# median: the median of the numbers on stdin (space or newline separated).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# served_at LOG: the first http://IP:PORT in a server's LOG that is where it
# serves HTTP — not wasmproc's admin API or dashboard line (wasmtime serve
# logs only the one address).
served_at() { grep -v "admin API\|dashboard" "$1" | grep -o 'http://[0-9.]*:[0-9]*' | head -n1 || true; }
