#!/usr/bin/env bash
# How much a live migration slows its clients: an unthrottled client
# against the same client with no migration, strategy by strategy.
#
# fio runs a 4 KiB random read/write mix (half each, iodepth 16, no rate
# limit) over a 1 GiB raw image full of random data, through dmm's NBD
# export. Baseline: `dmm serve` of the image. Then `dmm migrate` of the
# image to an empty sparse image with each of mirror, aio, lr and redirect,
# at priority normal and low, the same fio job starting as soon as the
# export is up. fio stops when the migration commits (SIGINT: fio reports
# what it measured so far) or after SECONDS, whichever comes first, so that
# every sample is taken while the migration runs; the table says which
# share of each fio window the migration covered. Rounds interleave the
# baseline and every configuration; the table shows medians.
#
# Usage: bench/client-impact.sh [SECONDS] [ROUNDS]   (defaults: 20 s, 3)
# Writes the "client-impact" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-20}
ROUNDS=${2:-3}
bench_prepare fio

bench_workdir

size=$((1 << 30))
source_image=$work/source.raw
echo "creating a 1 GiB image of random data in $work" >&2
random_image "$source_image" "$size"
sync

strategies=(mirror aio lr redirect)
priorities=(normal low)

# Starts fio's unthrottled random read/write mix on the export at SOCKET,
# its terse report into FILE; sets FIO_PID and FIO_STARTED. (fio is not
# tracked: it ends by itself, or when the export it uses goes away.)
start_fio() {
    FIO_STARTED=$(now)
    fio --name=load --ioengine=nbd --uri="nbd+unix:///?socket=$1" \
        --rw=randrw --bs=4k --iodepth=16 --size=1G --time_based \
        --runtime="$SECONDS_PER_RUN" --unified_rw_reporting=mixed \
        --output-format=terse --terse-version=3 >"$2" 2>/dev/null &
    FIO_PID=$!
}

# What fio measured (reads and writes together): "IOPS p99_usec
# max_usec window_seconds" (completion latencies).
fio_result() {
    awk -F';' '$3 == "load" && NF >= 50 {
        split($30, p, "="); printf "%d %d %d %.2f\n", $8, p[2], $15, $9 / 1000
    }' "$1"
}

# Reads the source image into the page cache, where every run starts from
# (other programs on the machine may have evicted it).
warm_source() {
    cat "$source_image" >/dev/null
}

# The baseline: the fio job on `dmm serve` of the source, no migration.
# Sets result to "IOPS p99_usec max_usec window_seconds".
baseline_round() {
    local pid
    warm_source
    "$DMM" serve "$source_image" --socket "$work/serve.sock" 2>/dev/null &
    pid=$!
    bench_track "$pid"
    wait_socket "$work/serve.sock"
    start_fio "$work/serve.sock" "$work/fio.out"
    wait "$FIO_PID"
    bench_stop "$pid"
    rm -f "$work/serve.sock"
    result=$(fio_result "$work/fio.out")
}

# The last event of a migration's JSON lines named NAME, if any.
last_event() {
    grep -E "\"event\":\"$2\"" "$1" | tail -1
}

# A field of a JSON event line (numbers and strings, unquoted).
event_field() {
    sed -n "s/.*\"$2\":\\([^,}]*\\).*/\\1/p" <<<"$1" | tr -d '"'
}

# One migration under the fio job. Sets result to "IOPS p99_usec max_usec
# window_seconds migration_seconds covered_fraction", where covered is the
# share of fio's window during which the migration ran.
migration_round() {
    local strategy=$1 priority=$2 pid destination=$work/destination.raw
    local ended='' end_time fio_end line
    empty_image "$destination" "$size"
    rm -rf "$work/state" "$work/migrate.sock"
    warm_source
    "$DMM" migrate "$source_image" "$destination" --strategy "$strategy" \
        --priority "$priority" --json --socket "$work/migrate.sock" \
        --state-dir "$work/state" >"$work/events" 2>/dev/null &
    pid=$!
    bench_track "$pid"
    wait_socket "$work/migrate.sock"
    start_fio "$work/migrate.sock" "$work/fio.out"
    while kill -0 "$FIO_PID" 2>/dev/null; do
        if [[ -z $ended ]] && last_event "$work/events" 'committed|failed' >/dev/null; then
            ended=$(now)
            kill -INT "$FIO_PID" 2>/dev/null || true
        fi
        sleep 0.02
    done
    wait "$FIO_PID" || true
    fio_end=$(now)
    # A migration still copying when fio ends finishes unloaded.
    while ! last_event "$work/events" 'committed|failed' >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "dmm migrate died" >&2; exit 1; }
        sleep 0.05
    done
    end_time=${ended:-$fio_end}
    line=$(last_event "$work/events" 'committed|failed')
    if [[ $(event_field "$line" event) != committed ]]; then
        echo "$strategy/$priority failed: $(event_field "$line" error)" >&2
        exit 1
    fi
    bench_stop "$pid"
    read -r iops p99 max window < <(fio_result "$work/fio.out")
    result=$(awk -v i="$iops" -v p="$p99" -v m="$max" -v w="$window" \
        -v e="$(event_field "$line" elapsed_seconds)" \
        -v s="$FIO_STARTED" -v f="$fio_end" -v d="$end_time" 'BEGIN {
        covered = (d - s) / (f - s); if (covered > 1) covered = 1
        printf "%d %d %d %.2f %.2f %.2f\n", i, p, m, w, e, covered
    }')
}

declare -A samples
record() {
    local key=$1 iops p99 max window elapsed covered
    read -r iops p99 max window elapsed covered <<<"$2"
    samples[$key/iops]+="$iops "
    samples[$key/p99]+="$p99 "
    samples[$key/max]+="$max "
    samples[$key/window]+="$window "
    if [[ -z ${elapsed:-} ]]; then return 0; fi
    samples[$key/elapsed]+="$elapsed "
    samples[$key/covered]+="$covered "
}

configs=()
for strategy in "${strategies[@]}"; do
    for priority in "${priorities[@]}"; do configs+=("$strategy/$priority"); done
done

for round in $(seq "$ROUNDS"); do
    baseline_round
    record baseline "$result"
    echo "round $round baseline: $result" >&2
    for config in "${configs[@]}"; do
        migration_round "${config%/*}" "${config#*/}"
        record "$config" "$result"
        echo "round $round $config: $result" >&2
    done
done

# One table row: the medians of KEY against the baseline's.
row() {
    local key=$1
    awk -v k="$key" -v i="$(median_of samples "$key/iops")" -v bi="$(median_of samples baseline/iops)" \
        -v p="$(median_of samples "$key/p99")" -v bp="$(median_of samples baseline/p99)" \
        -v m="$(median_of samples "$key/max")" -v w="$(median_of samples "$key/window")" \
        -v e="$(median_of samples "$key/elapsed")" -v c="$(median_of samples "$key/covered")" 'BEGIN {
        split(k, name, "/")
        printf "| %s | %s | %.0f | **%.2f** | %.2f | **%.2f** | %.1f | %.1f | %.1f | %.0f%% |\n",
            name[1], name[2], i, i / bi, p / 1000, p / bp, m / 1000, e, w, c * 100
    }'
}

report() {
    local key measure
    echo "## Client impact of a live migration (unthrottled client)"
    echo
    echo "\`bench/client-impact.sh $SECONDS_PER_RUN $ROUNDS\` on $(machine_line)."
    echo "fio \`--rw=randrw --bs=4k --iodepth=16\` with no rate limit over a 1 GiB raw image full of random data,"
    echo "through dmm's NBD export (Unix socket). Baseline: the same job on \`dmm serve\` of the image, no migration,"
    echo "for ${SECONDS_PER_RUN} s: $(awk -v i="$(median_of samples baseline/iops)" 'BEGIN {printf "%.0f", i}') IOPS, p99 $(awk -v p="$(median_of samples baseline/p99)" 'BEGIN {printf "%.2f", p / 1000}') ms,"
    echo "longest request $(awk -v p="$(median_of samples baseline/max)" 'BEGIN {printf "%.1f", p / 1000}') ms."
    echo "Then \`dmm migrate --strategy S --priority P\` of the image to an empty sparse image on the same"
    echo "filesystem, fio starting as soon as the export is up and stopped when the migration commits (copy and"
    echo "full verification done) or after ${SECONDS_PER_RUN} s: the fio window is what fio measured, the coverage the share"
    echo "of it during which the migration ran (a migration that outlasts fio finishes unloaded, which its time"
    echo "includes). Latencies are fio's completion latencies, reads and writes together."
    echo "Targets: IOPS ≥ 0.7× baseline, p99 ≤ 5× baseline, no request over 50 ms. Medians of $ROUNDS interleaved rounds;"
    echo "load average when the run ended: $(cut -d' ' -f1-3 /proc/loadavg) (the machine is shared)."
    echo
    echo "| strategy | priority | client IOPS | ÷ baseline | p99 ms | ÷ baseline | longest request ms | migration s | fio window s | coverage |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for config in "${configs[@]}"; do row "$config"; done
    echo
    echo "All samples (one per round; IOPS, p99 µs, longest µs, migration s):"
    echo
    echo '```'
    for key in baseline "${configs[@]}"; do
        for measure in iops p99 max elapsed; do
            [[ -n ${samples[$key/$measure]:-} ]] || continue
            printf '%-24s %s\n' "$key/$measure" "${samples[$key/$measure]}"
        done
    done
    echo '```'
}
publish_report client-impact report
