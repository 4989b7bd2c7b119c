#!/usr/bin/env bash
# The daemon under many migrations: 16 concurrent migrations of 256 MiB
# images (128 MiB of data each) under one daemon, vs the same 16 run one
# after another under the same daemon; the daemon's resident memory with 16
# migrations running; and the latency of `dmm stat` meanwhile.
#
# Usage: bench/daemon-scale.sh [COUNT [SIZE_MIB]]   (default 16 256)
# Writes the "daemon-scale" section of BENCHMARKS.md for 16 images of
# 256 MiB, "daemon-scale-COUNTxSIZE_MIB" for any other shape (e.g. 256 8:
# many small migrations at once).

source "$(dirname "$0")/lib.sh"

COUNT=${1:-16}
SIZE_MIB=${2:-256}
SECTION=daemon-scale
[[ $COUNT-$SIZE_MIB == 16-256 ]] || SECTION=daemon-scale-${COUNT}x$SIZE_MIB
# shellcheck disable=SC2119 # no peer tools to check
bench_prepare

bench_workdir

size=$((SIZE_MIB << 20))
piece=$((size / 8))
echo "creating $COUNT images of $SIZE_MIB MiB (half of it data) in $work" >&2
for i in $(seq "$COUNT"); do
    # Data, then as much hole, across the image.
    random_image "$work/source$i.raw" "$size" "$piece" "$piece"
done
sync
allocated=$((COUNT * size / 2))

fresh_targets() {
    for i in $(seq "$COUNT"); do
        empty_image "$work/target$i.raw" "$size"
    done
    sync
}

create() {
    dmm_cli create -p "source=$work/source$1.raw" -p "target=$work/target$1.raw" -p verify=none
}

start_daemon "$work/state"
idle_rss=$(rss_kib "$DAEMON_PID")

# Concurrent: all at once.
fresh_targets
start=$(now)
ids=()
for i in $(seq "$COUNT"); do ids+=("$(create "$i")"); done
sleep 0.5
busy_rss=$(rss_kib "$DAEMON_PID")
stat_ms=()
for _ in $(seq 40); do
    t0=$(date +%s%N)
    dmm_cli stat "${ids[0]}" >/dev/null
    t1=$(date +%s%N)
    stat_ms+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", (b - a) / 1e6}')")
done
for id in "${ids[@]}"; do wait_state "$id" switched-over; done
concurrent=$(since "$start")
peak_rss=$(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status")
for id in "${ids[@]}"; do dmm_cli delete -f "$id" >/dev/null; done

# Sequential: one after another, same daemon.
fresh_targets
start=$(now)
for i in $(seq "$COUNT"); do
    id=$(create "$i")
    wait_state "$id" switched-over
    dmm_cli delete -f "$id" >/dev/null
done
sequential=$(since "$start")

stat_median=$(median "${stat_ms[@]}")
stat_p95=$(printf '%s\n' "${stat_ms[@]}" | sort -g | awk '{v[NR] = $1} END {print v[int(NR * 0.95)]}')

report() {
    echo "## The daemon under $COUNT migrations"
    echo
    echo "\`bench/daemon-scale.sh $COUNT $SIZE_MIB\` on $(machine_line)."
    echo "$COUNT raw images of $SIZE_MIB MiB (half of it data), each migrated to an empty sparse image by one daemon"
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
}
publish_report "$SECTION" report
