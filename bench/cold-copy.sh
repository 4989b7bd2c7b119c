#!/usr/bin/env bash
# Cold copy: a 4 GiB raw image, half of it allocated, no client I/O.
# dmm migrate vs qemu-img convert -W -m 16, nbdcopy and cp --sparse=always,
# on the same files, in one run. Every copy ends with the destination
# flushed to disk (dmm flushes itself; the others are followed by sync), and
# every result is checked with qemu-img compare (not timed).
#
# Then the same copies inside an XFS file system on a loop device, where
# copy_file_range shares blocks (reflink): dmm still tracks and verifies the
# copy.
#
# Usage: bench/cold-copy.sh [ROUNDS]   (default 3)
# Writes the "cold-copy" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-3}
bench_prepare qemu-img nbdcopy cp mkfs.xfs

bench_workdir
size=$((4 << 30))
source_image=$work/source.raw
echo "creating a 4 GiB image with 2 GiB of random data in $work" >&2
# 64 MiB of data, then 64 MiB of hole, across the image.
random_image "$source_image" "$size" $((64 << 20)) $((64 << 20))
sync

destination=$work/destination.raw

# Runs every tool of the COMMANDS table (tool -> command; the destination
# exists, empty and sparse) ROUNDS times, interleaved, adding each time to
# the SAMPLES table and, with a SHARED table, the MiB the destination shares
# with the source; checks every result.
#   copy_rounds LABEL COMMANDS SAMPLES SOURCE DESTINATION [SHARED]
copy_rounds() {
    local label=$1 source=$4 destination=$5 round tool start took
    local -n commands_=$2 samples_=$3
    local -n shared_=${6:-_no_shared}
    for round in $(seq "$ROUNDS"); do
        for tool in "${tools[@]}"; do
            empty_image "$destination" "$size"
            rm -rf "$work/state"
            sync
            start=$(now)
            ${commands_[$tool]} >/dev/null 2>&1
            sync -f "$destination"
            took=$(since "$start")
            samples_["$tool"]+="$took "
            # Blocks the destination shares with the source: the reflinked part.
            shared_["$tool"]=$(filefrag -v "$destination" | awk '/shared/ {n += $6 + 0} END {print n * 4096 / 1048576}')
            qemu-img compare -q -f raw -F raw "$source" "$destination" ||
                { echo "$tool produced a different image ($label)" >&2; exit 1; }
            echo "$label round $round $tool ${took}s, ${shared_["$tool"]} MiB shared" >&2
        done
    done
}
# shellcheck disable=SC2034 # the SHARED table when none is asked for
declare -A _no_shared

# Fills the table COMMANDS (tool -> command) with the copies of SOURCE into
# DESTINATION (which exists, empty and sparse); QEMU_IMG and CP are the
# options that make those two peers write sparse or share blocks.
#   copy_commands COMMANDS SOURCE DESTINATION QEMU_IMG CP
copy_commands() {
    local -n table_=$1
    local source=$2 destination=$3 dmm
    dmm="$DMM migrate $source $destination --exit-when-done --state-dir $work/state --socket $work/dmm.sock"
    # shellcheck disable=SC2034 # the caller's table, filled here
    table_=(
        [dmm]="$dmm --verify none"
        [dmm-verified]="$dmm --verify full"
        [qemu-img]="qemu-img convert $4 -m 16 -n --target-is-zero -f raw -O raw $source $destination"
        [nbdcopy]="nbdcopy $source $destination"
        [cp]="cp $5 $source $destination"
    )
}
# shellcheck disable=SC2034 # filled and read through namerefs
declare -A commands
copy_commands commands "$source_image" "$destination" -W --sparse=always
tools=(dmm dmm-verified qemu-img nbdcopy cp)

# shellcheck disable=SC2034 # filled through copy_rounds' namerefs
declare -A seconds
copy_rounds ext4 commands seconds "$source_image" "$destination"

# The same source inside XFS (reflink on), on a loop device.
xfs=$work/xfs
truncate -s $((3 * size)) "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mkdir "$xfs"
mount -o loop "$work/xfs.img" "$xfs"
bench_unmount_at_exit "$xfs"
cp --sparse=always "$source_image" "$xfs/source.raw"
sync
xfs_destination=$xfs/destination.raw
# shellcheck disable=SC2034 # filled and read through namerefs
declare -A xfs_commands
copy_commands xfs_commands "$xfs/source.raw" "$xfs_destination" -C --reflink=always
# shellcheck disable=SC2034 # filled through copy_rounds' namerefs
declare -A xfs_seconds xfs_shared
copy_rounds xfs xfs_commands xfs_seconds "$xfs/source.raw" "$xfs_destination" xfs_shared

report() {
    echo "## Cold copy: dmm migrate vs qemu-img, nbdcopy, cp"
    echo
    echo "\`bench/cold-copy.sh $ROUNDS\` on $(machine_line)."
    echo "4 GiB raw image, 2 GiB allocated (64 MiB data / 64 MiB hole), into an empty sparse raw image on the same"
    echo "filesystem; no client I/O; each copy timed until the destination is on disk (\`sync\` after the peers)."
    echo "Median of $ROUNDS interleaved rounds; every result checked with \`qemu-img compare\`."
    echo "\`dmm\` is \`dmm migrate --exit-when-done --verify none\` (the default auto strategy, 1 MiB chunks, 8 in flight);"
    echo "\`dmm-verified\` adds the BLAKE3 comparison of every chunk (\`--verify full\`, the default), which the peers do not do."
    echo "Between local files dmm's copier copies each chunk's data extents with \`copy_file_range\` and starts their"
    echo "writeback at once (\`sync_file_range\`); the peers' time includes the \`sync\` that puts their copy on disk."
    echo
    time_ratio_table --volume "$size" seconds "${tools[@]}"
    echo
    echo "All samples (seconds):"
    echo
    echo '```'
    sample_lines seconds "${tools[@]}"
    echo '```'
    echo
    echo "### Inside XFS with reflink (loop device)"
    echo
    echo "The same copies with source and destination in one XFS file system (\`mkfs.xfs -m reflink=1\` on a loop"
    echo "device over a sparse file): dmm's copier uses \`copy_file_range\`, which XFS turns into shared extents,"
    echo "while it still tracks every chunk (and verifies it, for \`dmm-verified\`); \`qemu-img convert -C\` offloads"
    echo "the copy the same way; \`cp --reflink=always\` clones the whole file. Shared MiB: the destination's extents"
    echo "that share blocks with the source (\`filefrag -v\`), in the last round."
    echo
    time_ratio_table --volume "$size" xfs_seconds "${tools[@]}"
    echo
    echo "| tool | MiB shared with the source |"
    echo "|---|---:|"
    for tool in "${tools[@]}"; do echo "| $tool | ${xfs_shared[$tool]} |"; done
    echo
    echo "All samples (seconds):"
    echo
    echo '```'
    sample_lines xfs_seconds "${tools[@]}"
    echo '```'
}
publish_report cold-copy report
