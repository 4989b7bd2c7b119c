#!/usr/bin/env bash
# Volume migration against volume size: the same 64 MiB of data (two
# 32 MiB extents) in raw images of 1 GiB, 64 GiB and 1 TiB, and an 8 GiB
# image full of data, each copied into an empty sparse image by dmm migrate
# (with and without verification), qemu-img convert and nbdcopy, in one run.
# Time (until the destination is on disk: the peers are followed by sync)
# and peak resident memory of each tool, medians of ROUNDS rounds; every
# result checked with qemu-img compare (not timed).
#
# Usage: bench/volume-scaling.sh [ROUNDS]   (default 3)
# Writes the "volume-scaling" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-3}
bench_prepare qemu-img nbdcopy /usr/bin/time

bench_workdir
GIB=$((1 << 30))
MIB=$((1 << 20))
# name -> size; the dense image is random data throughout.
declare -A sizes=([1G]=$GIB [64G]=$((64 * GIB)) [1T]=$((1024 * GIB)) [8G-dense]=$((8 * GIB)))
images=(1G 64G 1T 8G-dense)
for image in "${images[@]}"; do
    path=$work/$image.raw
    if [[ $image == *dense ]]; then
        echo "creating $image (random data throughout)" >&2
        random_image "$path" "${sizes[$image]}"
    else
        echo "creating $image with 64 MiB of data" >&2
        empty_image "$path" "${sizes[$image]}"
        for at in 0 $((sizes[$image] / 2)); do
            head -c $((32 * MIB)) /dev/urandom |
                dd of="$path" bs=1M seek=$((at / MIB)) conv=notrunc status=none
        done
    fi
done
sync

destination=$work/destination.raw
tools=(dmm dmm-unverified qemu-img nbdcopy)
command_for() {
    local tool=$1 source=$2
    case $tool in
    dmm) echo "$DMM migrate $source $destination --exit-when-done --state-dir $work/state --socket $work/dmm.sock" ;;
    dmm-unverified) echo "$DMM migrate $source $destination --exit-when-done --verify none --state-dir $work/state --socket $work/dmm.sock" ;;
    qemu-img) echo "qemu-img convert -W -m 16 -n --target-is-zero -f raw -O raw $source $destination" ;;
    nbdcopy) echo "nbdcopy $source $destination" ;;
    esac
}

# "image tool" -> samples.
declare -A seconds rss
for round in $(seq "$ROUNDS"); do
    for image in "${images[@]}"; do
        source_image=$work/$image.raw
        for tool in "${tools[@]}"; do
            empty_image "$destination" "${sizes[$image]}"
            rm -rf "$work/state"
            sync
            start=$(now)
            # shellcheck disable=SC2046 # the command line is split on purpose
            /usr/bin/time -f %M -o "$work/rss" $(command_for "$tool" "$source_image") >/dev/null 2>&1
            sync -f "$destination"
            took=$(since "$start")
            seconds["$image $tool"]+="$took "
            rss["$image $tool"]+="$(tail -1 "$work/rss") "
            qemu-img compare -q -f raw -F raw "$source_image" "$destination" ||
                { echo "$tool produced a different image from $image" >&2; exit 1; }
            echo "round $round $image $tool ${took}s" >&2
        done
    done
done

report() {
    local image tool m reference
    echo "## Volume migration against volume size"
    echo
    echo "\`bench/volume-scaling.sh $ROUNDS\` on $(machine_line)."
    echo "Raw images of 1 GiB, 64 GiB and 1 TiB holding the same 64 MiB of data (two 32 MiB extents), and an"
    echo "8 GiB image full of random data, each copied into an empty sparse raw image on the same filesystem."
    echo "\`dmm\` is \`dmm migrate --exit-when-done\` (auto strategy, verification on: the default);"
    echo "\`dmm-unverified\` adds \`--verify none\`; \`qemu-img\` is \`qemu-img convert -W -m 16 -n --target-is-zero\`."
    echo "Seconds until the destination is on disk (the peers are followed by \`sync\`), median of $ROUNDS rounds;"
    echo "peak RSS from \`/usr/bin/time\`, median. Ratio: dmm's time ÷ the tool's (> 1: dmm faster)."
    echo
    echo "| image | tool | seconds | peak RSS MiB | dmm ÷ tool |"
    echo "|---|---|---:|---:|---:|"
    for image in "${images[@]}"; do
        reference=$(median_of seconds "$image dmm")
        for tool in "${tools[@]}"; do
            m=$(median_of seconds "$image $tool")
            awk -v i="$image" -v t="$tool" -v m="$m" -v r="$(median_of rss "$image $tool")" -v d="$reference" \
                'BEGIN { printf "| %s | %s | %.2f | %.0f | %.2f |\n", i, t, m, r / 1024, m / d }'
        done
    done
    echo
    echo "All samples (seconds):"
    echo
    echo '```'
    for image in "${images[@]}"; do
        for tool in "${tools[@]}"; do
            printf '%-9s %-15s %s\n' "$image" "$tool" "${seconds["$image $tool"]}"
        done
    done
    echo '```'
}
publish_report volume-scaling report
