#!/usr/bin/env bash
# Reading through a tree migration's access point against reading the
# target natively, after the migration (switched over, before commit).
#
# 1. Every small file of a tree (find | xargs cat), with warm caches: the
#    second of two passes, through the access point and natively,
#    interleaved.
# 2. One 1 GiB file read sequentially (dd, 1 MiB blocks), with none of it
#    in the page cache (the file's pages dropped before each read: the
#    access point and the target share them) and with all of it.
#
# Usage: bench/access-point.sh [ROUNDS] [SMALL_FILES]   (defaults 5 100000)
# Writes the "access-point" section of BENCHMARKS.md. Needs root (FUSE and
# FUSE passthrough).

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-5}
SMALL=${2:-100000}
bench_prepare find xargs dd
[[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }

bench_workdir
source_dir=$work/source
target=$work/target
access=$work/access
bench_unmount_at_exit "$access"

echo "building the tree in $work: $SMALL small files and a 1 GiB file" >&2
mkdir -p "$source_dir" "$target" "$access"
small_files "$source_dir/small" "$SMALL" 16 42
random_image "$source_dir/one-gib" $((1 << 30))
sync

start_daemon "$work/state" "$work/daemon.log"
id=$(dmm_cli create -p kind=tree -p "source=$source_dir" -p "target=$target" \
    -p "access=$access" -p verify=none | awk '{print $NF}')
wait_state "$id" switched-over

read_small() { (cd "$1" && find small -type f -print0 | xargs -0 cat >/dev/null); }
read_big() { dd if="$1/one-gib" of=/dev/null bs=1M status=none; }
# Drops the 1 GiB file's pages only (not the whole page cache, which would
# also evict dmm's own code and the kernel's entries for the access point).
drop_file_cache() { dd if="$target/one-gib" iflag=nocache count=0 status=none; }

declare -A seconds
for round in $(seq "$ROUNDS"); do
    for where in access native; do
        dir=$access
        [[ $where == native ]] && dir=$target
        read_small "$dir"
        start=$(now)
        read_small "$dir"
        seconds[small/$where]+="$(since "$start") "
        drop_file_cache
        start=$(now)
        read_big "$dir"
        seconds[cold/$where]+="$(since "$start") "
        start=$(now)
        read_big "$dir"
        seconds[warm/$where]+="$(since "$start") "
    done
    echo "round $round done: ${seconds[small/access]}/ ${seconds[small/native]}" >&2
done
passthrough=$(dmm_cli --json stat "$id" | sed -n 's/.*"passthrough_opens": *\([0-9]*\).*/\1/p')
dmm_cli commit "$id" >/dev/null

report() {
    echo "## Reading through the access point"
    echo
    echo "\`bench/access-point.sh $ROUNDS $SMALL\` on $(machine_line)."
    echo "A tree of $SMALL files of 1-16 KiB (in $(((SMALL + 999) / 1000)) directories) and one 1 GiB file, migrated"
    echo "by a daemon tree migration (verify=none) and read after it switched over, before commit: through the access"
    echo "point, and natively from the target directory, interleaved; median of $ROUNDS rounds."
    echo "Small files: \`find | xargs cat\`, the second of two passes (warm caches). 1 GiB file: \`dd bs=1M\`,"
    echo "after dropping the file's pages (\`dd iflag=nocache count=0\`: cold) and again right after (warm)."
    echo "The kernel passed $passthrough opens through to the target (FUSE passthrough)."
    echo
    echo "| read | access point s | native s | access ÷ native speed |"
    echo "|---|---:|---:|---:|"
    local kind a n
    for kind in small cold warm; do
        a=$(median_of seconds "$kind/access")
        n=$(median_of seconds "$kind/native")
        awk -v k="$kind" -v a="$a" -v n="$n" 'BEGIN {
            names["small"] = "every small file"; names["cold"] = "1 GiB, cold cache"
            names["warm"] = "1 GiB, warm cache"
            printf "| %s | %.3f | %.3f | **%.2f** |\n", names[k], a, n, n / a
        }'
    done
    echo
    echo "All samples (seconds):"
    echo
    echo '```'
    sample_lines seconds small/access small/native cold/access cold/native warm/access warm/native
    echo '```'
}
publish_report access-point report
