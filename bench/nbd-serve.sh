#!/usr/bin/env bash
# NBD serving: dmm serve vs qemu-nbd vs nbdkit's file plugin, same image,
# same fio jobs, in one run.
#
# Each server exports the same 1 GiB raw image on a Unix socket; fio's nbd
# engine runs 4 KiB random read and write and 1 MiB sequential read and
# write at queue depth 16 against each. Rounds interleave the servers so
# that machine noise hits all of them alike; the table shows medians. RUNS
# repeats the whole set of rounds against the same servers: the table is
# the last run's, and a line under it gives every run's dmm ÷ faster-peer
# ratio per job (the target is ≥ 1.0 on every job in each of three
# consecutive runs). Also records the resident memory of an idle `dmm serve`.
#
# Usage: bench/nbd-serve.sh [ROUNDS] [SECONDS] [RUNS]   (defaults: 5 rounds of 10 s, 1 run)
# Writes the "nbd-serve" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-5}
SECONDS_PER_JOB=${2:-10}
RUNS=${3:-1}
bench_prepare fio qemu-nbd nbdkit

bench_workdir

image=$work/image.raw
echo "creating a 1 GiB image of random data in $work" >&2
random_image "$image" $((1 << 30))

"$DMM" serve "$image" --socket "$work/dmm.sock" 2>/dev/null &
dmm_pid=$!
bench_track "$dmm_pid"
qemu-nbd -f raw --cache=writeback --aio=threads -t -k "$work/qemu-nbd.sock" "$image" &
bench_track $!
nbdkit -f -U "$work/nbdkit.sock" file "$image" &
bench_track $!
for server in dmm qemu-nbd nbdkit; do wait_socket "$work/$server.sock"; done
sleep 1
idle_rss_start=$(rss_kib "$dmm_pid")

# job name, fio rw, block size, unit
jobs=(
    "4k-randread randread 4k IOPS"
    "4k-randwrite randwrite 4k IOPS"
    "1m-read read 1M MiB/s"
    "1m-write write 1M MiB/s"
)
servers=(dmm qemu-nbd nbdkit)

# Prints IOPS for 4k jobs, MiB/s for 1M jobs.
run_fio() {
    local server=$1 rw=$2 bs=$3
    fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$work/$server.sock" \
        --rw="$rw" --bs="$bs" --iodepth=16 --size=1G --time_based \
        --runtime="$SECONDS_PER_JOB" --ramp_time=1 \
        --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' -v bs="$bs" 'NF > 50 {
            iops = $8 + $49; kib = $7 + $48
            if (bs == "4k") print iops; else printf "%.0f\n", kib / 1024
        }'
}

# dmm's median ÷ the faster peer's median for one job of this run.
faster_peer_ratio() {
    local name=$1
    awk -v d="$(median_of results "$name/dmm")" -v q="$(median_of results "$name/qemu-nbd")" \
        -v k="$(median_of results "$name/nbdkit")" 'BEGIN { printf "%.2f", d / (q > k ? q : k) }'
}

declare -A results ratios # ratios: job -> one ratio per run
for run in $(seq "$RUNS"); do
    results=()
    for round in $(seq "$ROUNDS"); do
        for job in "${jobs[@]}"; do
            read -r name rw bs _ <<<"$job"
            for server in "${servers[@]}"; do
                value=$(run_fio "$server" "$rw" "$bs")
                results[$name/$server]+="$value "
                echo "run $run round $round $name $server $value" >&2
            done
        done
    done
    for job in "${jobs[@]}"; do
        read -r name _ <<<"$job"
        ratios[$name]+="$(faster_peer_ratio "$name") "
    done
done
sleep 2
idle_rss_after=$(rss_kib "$dmm_pid")

report() {
    local job name unit server rows=()
    for job in "${jobs[@]}"; do
        read -r name _ _ unit <<<"$job"
        rows+=("$name $unit")
    done
    echo "## NBD serving: dmm vs qemu-nbd vs nbdkit"
    echo
    echo "\`bench/nbd-serve.sh $ROUNDS $SECONDS_PER_JOB $RUNS\` on $(machine_line)."
    echo "Same 1 GiB raw image (in the page cache), Unix sockets, fio's nbd engine at iodepth 16;"
    echo "median of $ROUNDS interleaved rounds of ${SECONDS_PER_JOB} s each; the table is the last of $RUNS consecutive runs."
    echo "qemu-nbd: \`-f raw --cache=writeback --aio=threads\`; nbdkit: \`file\` plugin, default threads."
    echo
    rate_ratio_table results "${servers[*]}" "${rows[@]}"
    echo
    echo -n "dmm ÷ faster peer in each of the $RUNS runs:"
    local separator=" "
    for job in "${jobs[@]}"; do
        read -r name _ <<<"$job"
        echo -n "$separator$name ${ratios[$name]% }"
        separator="; "
    done
    echo "."
    echo
    echo "Resident memory of \`dmm serve\`: $((idle_rss_start / 1024)) MiB idle after start," \
        "$((idle_rss_after / 1024)) MiB idle after the runs (target ≤ 20 MiB)."
    echo
    echo "All samples of the last run (one per round):"
    echo
    echo '```'
    for job in "${jobs[@]}"; do
        read -r name _ _ _ <<<"$job"
        for server in "${servers[@]}"; do
            printf '%-13s %-9s %s\n' "$name" "$server" "${results[$name/$server]}"
        done
    done
    echo '```'
}
publish_report nbd-serve report
