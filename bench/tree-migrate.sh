#!/usr/bin/env bash
# Tree migration: a tree of small files (1-16 KiB) plus large files.
#
# 1. Full migration time: a dmm tree migration (daemon, kind=tree, from
#    create until committed; with verify=none like the peers, and with the
#    default verify=full) vs rsync -aHAX and cp -a on the same tree, each
#    into an empty target, each timed until its data is on disk.
# 2. Time to first byte of a region of a 1 GiB file not migrated yet, read
#    through the
#    access point (at its start and at 768 MiB), the migration paused.
# (Reading through the access point after the migration against reading
# the target natively: bench/access-point.sh.)
#
# Usage: bench/tree-migrate.sh [ROUNDS] [SMALL_FILES] [LARGE_FILES] [LARGE_MIB]
#        (defaults 3 100000 20 256: the issue's tree)
# Writes the "tree-migrate" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-3}
SMALL=${2:-100000}
LARGE=${3:-20}
LARGE_MIB=${4:-256}
bench_prepare rsync cp

bench_workdir
source_dir=$work/source
target=$work/target
access=$work/access
state=$work/state
bench_unmount_at_exit "$access"

echo "building the tree in $work: $SMALL small files, $LARGE x $LARGE_MIB MiB" >&2
mkdir -p "$source_dir/small" "$source_dir/large" "$target" "$access"
dirs=$(((SMALL + 999) / 1000))
small_files "$source_dir/small" "$SMALL" 16 42
random_image "$work/large.base" $((LARGE_MIB << 20))
for ((i = 0; i < LARGE; i++)); do
    cp "$work/large.base" "$source_dir/large/f$i"
    head -c 4096 /dev/urandom | dd of="$source_dir/large/f$i" conv=notrunc status=none
done
rm "$work/large.base"
random_image "$work/one-gib" $((1 << 30))
sync

fresh_target() {
    rm -rf "$target"
    mkdir "$target"
    rm -rf "$state/trees"
    sync
}

start_daemon "$state" "$work/daemon.log"

# One dmm tree migration from create to commit; prints the seconds.
dmm_migration() {
    local verify=$1 start id
    start=$(now)
    id=$(dmm_cli create -p kind=tree -p "source=$source_dir" -p "target=$target" \
        -p "access=$access" -p "verify=$verify" | awk '{print $NF}')
    wait_state "$id" switched-over
    dmm_cli commit "$id" >/dev/null
    since "$start"
    dmm_cli delete "$id" >/dev/null
}

declare -A seconds
tools=(dmm dmm-verified rsync cp)
for round in $(seq "$ROUNDS"); do
    for tool in "${tools[@]}"; do
        fresh_target
        case $tool in
        dmm) took=$(dmm_migration none) ;;
        dmm-verified) took=$(dmm_migration full) ;;
        rsync)
            start=$(now)
            rsync -aHAX "$source_dir/" "$target/"
            sync -f "$target"
            took=$(since "$start")
            ;;
        cp)
            start=$(now)
            cp -a "$source_dir/." "$target/"
            sync -f "$target"
            took=$(since "$start")
            ;;
        esac
        differences=$(rsync -aHAXn --checksum -i "$source_dir/" "$target/" | head -5)
        [[ -z $differences ]] || { echo "$tool: target differs: $differences" >&2; exit 1; }
        seconds[$tool]+="$took "
        echo "round $round $tool ${took}s" >&2
    done
done

# Time to first byte: regions of a 1 GiB file the paused migration has not
# copied. A worker starts on the file the moment the migration exists, so it
# is created with a rate limit (the worker copies one segment, then waits)
# and paused; the reads are far from that segment.
ttfb_start=() ttfb_middle=()
for round in $(seq "$ROUNDS"); do
    fresh_target
    rm -rf "$work/ttfb-source"
    mkdir -p "$work/ttfb-source/dir"
    ln "$work/one-gib" "$work/ttfb-source/dir/one-gib"
    # Pause at once; if a worker got to the file first, try again (the
    # measure is of a file with nothing migrated).
    for _ in $(seq 10); do
        id=$(dmm_cli create -p kind=tree -p "source=$work/ttfb-source" -p "target=$target" \
            -p "access=$access" -p rate=1M | awk '{print $NF}')
        dmm_cli pause "$id" >/dev/null
        done_bytes=$(dmm_cli --json stat "$id" | sed -n 's/.*"bytes_done":\([0-9]*\).*/\1/p')
        ((done_bytes <= 1 << 20)) && break
        dmm_cli halt --remove "$id" >/dev/null
        dmm_cli delete "$id" >/dev/null
        fresh_target
    done
    ((done_bytes <= 1 << 20)) || { echo "the workers always got to the file first" >&2; exit 1; }
    start=$(now)
    dd if="$access/dir/one-gib" bs=4096 count=1 skip=$((256 << 8)) status=none >/dev/null
    ttfb_start+=("$(since "$start")")
    start=$(now)
    dd if="$access/dir/one-gib" bs=4096 count=1 skip=$((768 << 8)) status=none >/dev/null
    ttfb_middle+=("$(since "$start")")
    dmm_cli halt --remove "$id" >/dev/null
    dmm_cli delete "$id" >/dev/null
    echo "round $round ttfb ${ttfb_start[-1]}s / ${ttfb_middle[-1]}s" >&2
done

report() {
    local large_gib
    large_gib=$(awk -v n="$LARGE" -v m="$LARGE_MIB" 'BEGIN {printf "%.1f", n * m / 1024}')
    echo "## Tree migration: dmm vs rsync -aHAX and cp -a"
    echo
    echo "\`bench/tree-migrate.sh $ROUNDS $SMALL $LARGE $LARGE_MIB\` on $(machine_line)."
    echo "$SMALL files of 1-16 KiB in $dirs directories plus $LARGE files of $LARGE_MIB MiB ($large_gib GiB),"
    echo "into an empty target directory on the same filesystem, source in the page cache."
    echo "dmm: a daemon tree migration from \`dmm create -p kind=tree …\` until \`dmm commit\` returns (commit syncs the"
    echo "target file system); the peers are followed by \`sync\`. Every result checked with \`rsync -aHAXn --checksum -i\`"
    echo "(no output). Median of $ROUNDS interleaved rounds."
    echo "\`dmm\` uses verify=none like the peers; \`dmm-verified\` adds the default BLAKE3 comparison of every file."
    echo
    time_ratio_table seconds "${tools[@]}"
    echo
    awk -v a="$(median "${ttfb_start[@]}")" -v b="$(median "${ttfb_middle[@]}")" 'BEGIN {
        printf "Time to first byte of regions not migrated yet of a 1 GiB file (migration paused), through the access point,\n"
        printf "4 KiB reads: **%.1f ms** at 256 MiB, **%.1f ms** at 768 MiB (medians).\n", a * 1000, b * 1000
    }'
    echo
    echo "All samples (seconds):"
    echo
    echo '```'
    sample_lines seconds "${tools[@]}"
    printf '%-13s %s\n' "ttfb-256M" "${ttfb_start[*]}"
    printf '%-13s %s\n' "ttfb-768M" "${ttfb_middle[*]}"
    echo '```'
}
publish_report tree-migrate report
