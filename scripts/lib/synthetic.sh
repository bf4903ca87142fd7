# shellcheck shell=bash
# Sourced by the generation scripts: their default inputs, made from the embedded default data set.

# first_synthetic_images SCRIPT DIR N: the paths of the first N images of DIR (sorted), one per
# line; one-line error and exit 2 when DIR is missing. `sed` reads to the end: a `head` would stop
# early and, under pipefail, kill the caller with SIGPIPE (exit 141) on a large folder.
first_synthetic_images() {
  local script=$1 dir=$2 count=$3
  [[ -d "$dir" ]] || { echo "$script: no images in $dir; run ./scripts/preprocess.sh or set" \
                         "INPUT_SOURCE" >&2; exit 2; }
  find "$dir" -maxdepth 1 -name '*.png' | sort | sed -n "1,${count}p"
}

# caption_of IMAGE: the caption beside IMAGE (IMAGE.txt) on one line.
caption_of() {
  tr '\t\n' '  ' < "${1%.png}.txt" | sed 's/ *$//'
}
