# Shared helpers of the benchmark scripts (sourced, not run).

set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DMM="$BENCH_ROOT/target/release/dmm"

# Builds dmm in release mode and checks the peer tools are installed.
bench_prepare() {
    (cd "$BENCH_ROOT" && cargo build --release --quiet)
    local missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        echo "missing tools: ${missing[*]} (run scripts/install-test-deps)" >&2
        exit 1
    fi
}

# Waits until a Unix socket exists.
wait_socket() {
    for _ in $(seq 200); do
        [[ -S $1 ]] && return 0
        sleep 0.05
    done
    echo "socket $1 did not appear" >&2
    exit 1
}

# The median of the numbers given as arguments.
median() {
    printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'
}

# Resident memory of a process, in KiB.
rss_kib() {
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

# Replaces the section between <!-- NAME:start --> and <!-- NAME:end --> of
# BENCHMARKS.md with the contents of a file (appending it if missing).
publish_section() {
    local name=$1 body=$2 file="$BENCH_ROOT/BENCHMARKS.md"
    [[ -f $file ]] || printf '# Benchmarks\n\nEvery table comes from one run of the script named in it, on the machine it names. Ratios are dmm ÷ peer: above 1.0 dmm is faster.\n' >"$file"
    if ! grep -q "<!-- $name:start -->" "$file"; then
        printf '\n<!-- %s:start -->\n<!-- %s:end -->\n' "$name" "$name" >>"$file"
    fi
    awk -v start="<!-- $name:start -->" -v end="<!-- $name:end -->" -v body="$body" '
        $0 == start { print; while ((getline line < body) > 0) print line; skip = 1; next }
        $0 == end { skip = 0 }
        !skip { print }
    ' "$file" >"$file.new"
    mv "$file.new" "$file"
}

machine_line() {
    echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(date -u +%Y-%m-%d)"
}
