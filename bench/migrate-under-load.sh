#!/usr/bin/env bash
# Live migration under a steady client load, every strategy, in one run.
#
# A 1 GiB raw image (512 MiB allocated) is migrated to an empty sparse image
# while fio writes 4 KiB blocks at random (iodepth 16, a steady rate)
# through dmm's NBD export. The same fio job against `dmm serve` of the same
# image, with no migration, is the baseline. For each strategy: migration
# time, copy redundancy (bytes the copier wrote to the destination ÷ bytes
# allocated in the source) and all destination writes ÷ allocated, client
# IOPS and p99 latency relative to the baseline, the longest client
# request, and the switchover pause dmm measured.
#
# Usage: bench/migrate-under-load.sh [SECONDS] [IOPS]   (defaults: 20 s, 4000)
# Writes the "migrate-under-load" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-20}
IOPS=${2:-4000}
bench_prepare fio qemu-img

bench_workdir

size=$((1 << 30))
source_image=$work/source.raw
echo "creating a 1 GiB image with 512 MiB of random data in $work" >&2
# 64 MiB of data, then 64 MiB of hole, across the image.
random_image "$source_image" "$size" $((64 << 20)) $((64 << 20))
allocated=$(allocated_bytes "$source_image")
sync

# fio's steady random-write load through an export; prints
# "IOPS p99_usec max_usec".
run_fio() {
    fio --name=load --ioengine=nbd --uri="nbd+unix:///?socket=$1" \
        --rw=randwrite --bs=4k --iodepth=16 --rate_iops="$IOPS" \
        --size=512M --time_based --runtime="$SECONDS_PER_RUN" \
        --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' 'NF > 80 { split($71, p, "="); print $49, p[2], $80 }'
}

# Baseline: the same load on dmm serve, no migration.
"$DMM" serve "$source_image" --socket "$work/serve.sock" 2>/dev/null &
pid=$!
bench_track "$pid"
wait_socket "$work/serve.sock"
read -r base_iops base_p99 base_max < <(run_fio "$work/serve.sock")
bench_stop "$pid"
echo "baseline: $base_iops IOPS, p99 ${base_p99} us, max ${base_max} us" >&2

rows=()
for strategy in precopy mirror aio slr lr redirect auto; do
    destination=$work/destination.raw
    empty_image "$destination" "$size"
    rm -rf "$work/state"
    sync
    "$DMM" migrate "$source_image" "$destination" --strategy "$strategy" --json \
        --socket "$work/migrate.sock" --state-dir "$work/state" >"$work/events" 2>/dev/null &
    pid=$!
    bench_track "$pid"
    wait_socket "$work/migrate.sock"
    read -r iops p99 max < <(run_fio "$work/migrate.sock")
    bench_stop "$pid"
    rm -f "$work/migrate.sock"
    # The last event: committed, or failed (with the reason).
    last=$(grep -E '"event":"(committed|failed)"' "$work/events" | tail -1)
    field() { sed -n "s/.*\"$1\":\\([^,}]*\\).*/\\1/p" <<<"$last" | tr -d '"'; }
    event=$(field event)
    if [[ $event == committed ]]; then
        outcome="finished in $(awk -v s="$(field elapsed_seconds)" 'BEGIN {printf "%.1f s", s}')"
    elif [[ -n $event ]]; then
        outcome="failed: $(field error | cut -c1-60)"
    else
        outcome="not finished in ${SECONDS_PER_RUN} s"
    fi
    # Clients allocate more as they write: judge the copying against the
    # data the finished volume holds.
    final=$(allocated_bytes "$destination")
    copied=$(field copied_bytes)
    client=$(field client_destination_bytes)
    pause=$(field longest_pause_ms)
    rows+=("$(awk -v st="$strategy" -v o="$outcome" -v c="${copied:-0}" -v cl="${client:-0}" -v a="$final" \
        -v i="$iops" -v bi="$base_iops" -v p="$p99" -v bp="$base_p99" -v m="$max" -v ps="${pause:-0}" 'BEGIN {
        printf "| %s | %s | %.2f | %.2f | %.0f (%.2f) | %.1f (%.2f) | %.1f | %.2f |", st, o, c / a, (c + cl) / a,
            i, i / bi, p / 1000, p / bp, m / 1000, ps
    }')")
    echo "$strategy: $outcome, $iops IOPS, p99 $p99 us, max $max us" >&2
done

report() {
    echo "## Live migration under load, every strategy"
    echo
    echo "\`bench/migrate-under-load.sh $SECONDS_PER_RUN $IOPS\` on $(machine_line)."
    echo "1 GiB raw image, $((allocated >> 20)) MiB allocated, migrated to an empty sparse image on the same filesystem"
    echo "while fio writes 4 KiB blocks at random over the allocated half through the NBD export (iodepth 16, a steady"
    echo "$IOPS IOPS, ${SECONDS_PER_RUN} s). Baseline: the same fio job on \`dmm serve\` of the image, no migration:"
    echo "$base_iops IOPS, p99 $(awk -v p="$base_p99" 'BEGIN {printf "%.1f", p / 1000}') ms, longest request $(awk -v p="$base_max" 'BEGIN {printf "%.1f", p / 1000}') ms."
    echo "Copy redundancy = bytes the copier wrote to the destination ÷ bytes allocated in the finished destination"
    echo "(clients allocate more as they write); destination writes ÷ allocated also counts the client writes dmm"
    echo "sent to the destination. A failed migration's destination is incomplete, so its ratios are against less."
    echo "The pause is the time dmm held clients at"
    echo "switchover (measured by dmm); the longest request is fio's largest completion latency over the whole run."
    echo
    echo "| strategy | outcome | copy redundancy | destination writes ÷ allocated | client IOPS (÷ baseline) | p99 ms (÷ baseline) | longest request ms | switchover pause ms |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
}
publish_report migrate-under-load report
