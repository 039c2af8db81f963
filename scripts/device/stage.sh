#!/usr/bin/env bash
# Bring a file larger than one device call may carry (64 MiB; mini-ImageNet's images.zip is 156 MB) to a lent
# machine in parts, over consecutive calls, into a folder outside the carried paths that the warm machine keeps.
#
#   here:   bash scripts/device/stage.sh split FILE PARTS_DIR [PART_MIB]
#           -> PARTS_DIR/NAME.part-000, -001, ... (default 56 MiB each) and PARTS_DIR/NAME.sha256
#   there:  bash scripts/device/stage.sh join CARRIED_DIR DEST_DIR
#           -> copies whatever parts CARRIED_DIR holds into DEST_DIR/.parts/; once every part is there,
#              assembles DEST_DIR/NAME, checks its sha256 and removes the parts. Exit 0 when assembled,
#              75 while parts are still missing (carry the next ones and call again), 1 on a checksum error.
#
# One call carries `.stage/` holding the .sha256 file and as many parts as fit (one or two), plus whatever
# else the call needs; the next call, made while the machine is still warm, carries the next parts.
set -euo pipefail

die() { echo "stage: $*" >&2; exit "${2:-2}"; }

split_file() {
    local file=$1 dir=$2 mib=${3:-56}
    [[ -f $file ]] || die "no such file: $file"
    local name
    name=$(basename "$file")
    mkdir -p "$dir"
    split -b "${mib}M" -d -a 3 "$file" "$dir/$name.part-"
    local parts
    parts=$(ls "$dir/$name".part-* | wc -l)
    (cd "$(dirname "$file")" && sha256sum "$name") | awk -v n="$parts" '{print $1, $2, n}' >"$dir/$name.sha256"
    echo "stage: $file -> $parts part(s) of at most ${mib} MiB in $dir (checksum $dir/$name.sha256)"
}

join_parts() {
    local carried=$1 dest=$2
    [[ -d $carried ]] || die "no such folder: $carried"
    mkdir -p "$dest/.parts"
    local sums
    sums=$(ls "$carried"/*.sha256 "$dest"/.parts/*.sha256 2>/dev/null | head -n 1 || true)
    [[ -n $sums ]] || die "no NAME.sha256 in $carried or $dest/.parts: carry the file written by 'split'"
    cp -f "$carried"/*.sha256 "$dest/.parts/" 2>/dev/null || true
    local part
    for part in "$carried"/*.part-*; do
        [[ -e $part ]] || continue
        cp -f "$part" "$dest/.parts/"
    done
    local status=0 sumfile
    for sumfile in "$dest"/.parts/*.sha256; do
        local digest name count have
        read -r digest name count <"$sumfile"
        if [[ -f $dest/$name ]] && echo "$digest  $dest/$name" | sha256sum -c --status; then
            echo "stage: $dest/$name already assembled"
            continue
        fi
        have=$(ls "$dest/.parts/$name".part-* 2>/dev/null | wc -l)
        if [[ $have -lt $count ]]; then
            echo "stage: $name: $have of $count part(s) here; carry the rest and call again"
            status=75
            continue
        fi
        cat "$dest/.parts/$name".part-* >"$dest/$name.tmp"
        if ! echo "$digest  $dest/$name.tmp" | sha256sum -c --status; then
            rm -f "$dest/$name.tmp"
            die "$name: sha256 of the assembled file does not match $digest (a part is damaged)" 1
        fi
        mv "$dest/$name.tmp" "$dest/$name"
        rm -f "$dest/.parts/$name".part-*
        echo "stage: assembled $dest/$name ($count part(s), sha256 ok)"
    done
    return $status
}

case ${1:-} in
    split) [[ $# -ge 3 ]] || die "usage: stage.sh split FILE PARTS_DIR [PART_MIB]"; split_file "$2" "$3" "${4:-56}" ;;
    join) [[ $# -eq 3 ]] || die "usage: stage.sh join CARRIED_DIR DEST_DIR"; join_parts "$2" "$3" ;;
    *) die "usage: stage.sh split FILE PARTS_DIR [PART_MIB] | stage.sh join CARRIED_DIR DEST_DIR" ;;
esac
