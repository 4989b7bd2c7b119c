#!/usr/bin/env bash
# The daemon under many migrations: 16 concurrent migrations of 256 MiB
# images (128 MiB of data each) under one daemon, vs the same 16 run one
# after another under the same daemon; the daemon's resident memory with 16
# migrations running; and the latency of `dmm stat` meanwhile.
#
# Usage: bench/daemon-scale.sh [COUNT]   (default 16)
# Writes the "daemon-scale" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

COUNT=${1:-16}
bench_prepare

work=$(mktemp -d "${TMPDIR:-/var/tmp}/dmm-bench.XXXXXX")
daemon_pid=
cleanup() {
    [[ -n $daemon_pid ]] && kill "$daemon_pid" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

size=$((256 << 20))
echo "creating $COUNT images of 256 MiB (128 MiB of data each) in $work" >&2
for i in $(seq "$COUNT"); do
    truncate -s "$size" "$work/source$i.raw"
    for ((m = 0; m < 8; m += 2)); do
        head -c $((32 << 20)) /dev/urandom |
            dd of="$work/source$i.raw" bs=1M seek=$((m * 32)) conv=notrunc status=none
    done
done
sync
allocated=$((COUNT * (128 << 20)))

dmm() { "$DMM" --state-dir "$work/state" "$@"; }

fresh_targets() {
    for i in $(seq "$COUNT"); do
        rm -f "$work/target$i.raw"
        truncate -s "$size" "$work/target$i.raw"
    done
    sync
}

# Waits until every listed migration is switched-over.
wait_switched() {
    for id in "$@"; do
        until [[ $(dmm --json stat "$id" | sed -n 's/.*"state": *"\([a-z-]*\)".*/\1/p' | head -1) == switched-over ]]; do
            sleep 0.05
        done
    done
}

create() {
    dmm create -p "source=$work/source$1.raw" -p "target=$work/target$1.raw" -p verify=none
}

"$DMM" daemon --state-dir "$work/state" 2>/dev/null &
daemon_pid=$!
until dmm list >/dev/null 2>&1; do sleep 0.05; done
idle_rss=$(rss_kib "$daemon_pid")

# Concurrent: all at once.
fresh_targets
start=$(date +%s.%N)
ids=()
for i in $(seq "$COUNT"); do ids+=("$(create "$i")"); done
sleep 0.5
busy_rss=$(rss_kib "$daemon_pid")
stat_ms=()
for _ in $(seq 40); do
    t0=$(date +%s%N)
    dmm stat "${ids[0]}" >/dev/null
    t1=$(date +%s%N)
    stat_ms+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", (b - a) / 1e6}')")
done
wait_switched "${ids[@]}"
end=$(date +%s.%N)
concurrent=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}')
peak_rss=$(awk '/^VmHWM:/ {print $2}' "/proc/$daemon_pid/status")
for id in "${ids[@]}"; do dmm delete -f "$id" >/dev/null; done

# Sequential: one after another, same daemon.
fresh_targets
start=$(date +%s.%N)
for i in $(seq "$COUNT"); do
    id=$(create "$i")
    wait_switched "$id"
    dmm delete -f "$id" >/dev/null
done
end=$(date +%s.%N)
sequential=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}')

# shellcheck disable=SC2086
stat_median=$(median "${stat_ms[@]}")
stat_p95=$(printf '%s\n' "${stat_ms[@]}" | sort -g | awk '{v[NR] = $1} END {print v[int(NR * 0.95)]}')

body=$(mktemp)
{
    echo "## The daemon under $COUNT migrations"
    echo
    echo "\`bench/daemon-scale.sh $COUNT\` on $(machine_line)."
    echo "$COUNT raw images of 256 MiB (128 MiB of data each), each migrated to an empty sparse image by one daemon"
    echo "(\`dmm create … -p verify=none\`, default strategy and copies), all at once, then one after another."
    echo "Time runs from the first \`create\` to the last migration being switched-over."
    echo
    echo "| run | seconds | aggregate throughput (allocated data) |"
    echo "|---|---:|---:|"
    awk -v c="$concurrent" -v s="$sequential" -v a="$allocated" 'BEGIN {
        printf "| %d concurrent | %.2f | %.0f MiB/s |\n", '"$COUNT"', c, a / 1048576 / c
        printf "| %d one after another | %.2f | %.0f MiB/s |\n", '"$COUNT"', s, a / 1048576 / s
        printf "| **concurrent ÷ sequential throughput** | | **%.2f** |\n", s / c
    }'
    echo
    echo "Daemon resident memory: $((idle_rss / 1024)) MiB idle, $((busy_rss / 1024)) MiB with $COUNT migrations running,"
    echo "$((peak_rss / 1024)) MiB at most (VmHWM)."
    echo "\`dmm stat\` while $COUNT migrations run (40 calls, each a new process and API connection):"
    echo "median $stat_median ms, 95th percentile $stat_p95 ms."
} >"$body"
publish_section daemon-scale "$body"
cat "$body"
rm -f "$body"
