#!/usr/bin/env bash
# Cold copy: a 4 GiB raw image, half of it allocated, no client I/O.
# dmm migrate vs qemu-img convert -W -m 16, nbdcopy and cp --sparse=always,
# on the same files, in one run. Every copy ends with the destination
# flushed to disk (dmm flushes itself; the others are followed by sync), and
# every result is checked with qemu-img compare (not timed).
#
# Usage: bench/cold-copy.sh [ROUNDS]   (default 3)
# Writes the "cold-copy" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-3}
bench_prepare qemu-img nbdcopy cp

bench_workdir
size=$((4 << 30))
source_image=$work/source.raw
echo "creating a 4 GiB image with 2 GiB of random data in $work" >&2
# 64 MiB of data, then 64 MiB of hole, across the image.
random_image "$source_image" "$size" $((64 << 20)) $((64 << 20))
sync

destination=$work/destination.raw
fresh_destination() {
    empty_image "$destination" "$size"
    rm -rf "$work/state"
    sync
}

# tool name -> command (the destination exists, empty and sparse).
declare -A commands=(
    [dmm]="$DMM migrate $source_image $destination --exit-when-done --verify none --state-dir $work/state --socket $work/dmm.sock"
    [dmm-verified]="$DMM migrate $source_image $destination --exit-when-done --verify full --state-dir $work/state --socket $work/dmm.sock"
    [qemu-img]="qemu-img convert -W -m 16 -n --target-is-zero -f raw -O raw $source_image $destination"
    [nbdcopy]="nbdcopy $source_image $destination"
    [cp]="cp --sparse=always $source_image $destination"
)
tools=(dmm dmm-verified qemu-img nbdcopy cp)

declare -A seconds
for round in $(seq "$ROUNDS"); do
    for tool in "${tools[@]}"; do
        fresh_destination
        start=$(now)
        ${commands[$tool]} >/dev/null 2>&1
        sync -f "$destination"
        took=$(since "$start")
        seconds[$tool]+="$took "
        qemu-img compare -q -f raw -F raw "$source_image" "$destination" ||
            { echo "$tool produced a different image" >&2; exit 1; }
        echo "round $round $tool ${took}s" >&2
    done
done

report() {
    echo "## Cold copy: dmm migrate vs qemu-img, nbdcopy, cp"
    echo
    echo "\`bench/cold-copy.sh $ROUNDS\` on $(machine_line)."
    echo "4 GiB raw image, 2 GiB allocated (64 MiB data / 64 MiB hole), into an empty sparse raw image on the same"
    echo "filesystem; no client I/O; each copy timed until the destination is on disk (\`sync\` after the peers)."
    echo "Median of $ROUNDS interleaved rounds; every result checked with \`qemu-img compare\`."
    echo "\`dmm\` is \`dmm migrate --exit-when-done --verify none\` (the default auto strategy, 1 MiB chunks, 8 in flight);"
    echo "\`dmm-verified\` adds the BLAKE3 comparison of every chunk (\`--verify full\`, the default), which the peers do not do."
    echo
    time_ratio_table --volume "$size" seconds "${tools[@]}"
    echo
    echo "All samples (seconds):"
    echo
    echo '```'
    sample_lines seconds "${tools[@]}"
    echo '```'
}
publish_report cold-copy report
