#!/usr/bin/env bash
# Tree migration against tree size: trees of small files (1-4 KiB, 1,000
# per directory) migrated by a dmm tree migration (daemon, kind=tree,
# verify=none like the peer, from create until committed) and by
# rsync -aHAX, each into an empty target and timed until the data is on
# disk; with the journal's size at the end of the migration and the peak
# resident memory of the daemon (a fresh one per tree) and of rsync.
# Every result is checked with rsync --checksum (not timed).
#
# Usage: bench/tree-scaling.sh [FILES...]   (default 10000 100000 1000000)
# Writes the "tree-scaling" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

SIZES=("$@")
((${#SIZES[@]})) || SIZES=(10000 100000 1000000)
bench_prepare rsync /usr/bin/time

bench_workdir
access=$work/access
mkdir -p "$access"
bench_unmount_at_exit "$access"

# "files tool" -> seconds, peak RSS (KiB); "files" -> journal bytes.
declare -A seconds rss journal
for files in "${SIZES[@]}"; do
    source_dir=$work/source-$files
    target=$work/target
    echo "building a tree of $files files" >&2
    small_files "$source_dir" "$files" 4 7
    sync

    rm -rf "$target" "$work/state" && mkdir "$target" && sync
    start_daemon "$work/state"
    start=$(now)
    id=$(dmm_cli create -p kind=tree -p "source=$source_dir" -p "target=$target" \
        -p "access=$access" -p verify=none | awk '{print $NF}')
    wait_state "$id" switched-over
    journal[$files]=$(du -cb "$work/state/trees/$id"/journal.db* | tail -1 | cut -f1)
    dmm_cli commit "$id" >/dev/null
    sync -f "$target"
    seconds["$files dmm"]=$(since "$start")
    rss["$files dmm"]=$(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status")
    bench_stop "$DAEMON_PID"
    differences=$(rsync -aHAXn --checksum -i "$source_dir/" "$target/" | head -5)
    [[ -z $differences ]] || { echo "dmm: target differs: $differences" >&2; exit 1; }
    echo "$files files: dmm ${seconds["$files dmm"]}s" >&2

    rm -rf "$target" && mkdir "$target" && sync
    start=$(now)
    /usr/bin/time -f %M -o "$work/rss" rsync -aHAX "$source_dir/" "$target/"
    sync -f "$target"
    seconds["$files rsync"]=$(since "$start")
    rss["$files rsync"]=$(tail -1 "$work/rss")
    echo "$files files: rsync ${seconds["$files rsync"]}s" >&2
    rm -rf "$source_dir" "$target"
done

report() {
    local files
    echo "## Tree migration against tree size"
    echo
    echo "\`bench/tree-scaling.sh ${SIZES[*]}\` on $(machine_line)."
    echo "Trees of small files (1-4 KiB, 1,000 per directory) migrated into an empty target on the same filesystem,"
    echo "once each: \`dmm\` is a tree migration under a fresh daemon (\`-p kind=tree -p verify=none\`, from create"
    echo "until committed), \`rsync\` is \`rsync -aHAX\`; both timed until the target is on disk and checked with"
    echo "\`rsync --checksum\`. Journal: the migration's SQLite journal (with its WAL) when it is ready to commit."
    echo "Peak RSS: the daemon's VmHWM, rsync's from \`/usr/bin/time\`. Ratio: rsync's time ÷ dmm's (> 1: dmm faster)."
    echo
    echo "| files | dmm s | rsync s | ratio | journal MiB | dmm peak RSS MiB | rsync peak RSS MiB |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for files in "${SIZES[@]}"; do
        awk -v f="$files" -v d="${seconds["$files dmm"]}" -v r="${seconds["$files rsync"]}" \
            -v j="${journal[$files]}" -v dm="${rss["$files dmm"]}" -v rm="${rss["$files rsync"]}" \
            'BEGIN { printf "| %d | %.2f | %.2f | %.2f | %.1f | %.0f | %.0f |\n", f, d, r, r / d, j / 1048576, dm / 1024, rm / 1024 }'
    done
}
publish_report tree-scaling report
