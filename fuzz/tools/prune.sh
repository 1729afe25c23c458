#!/usr/bin/env bash
# Keeps a cached CARGO_TARGET_DIR from growing run after run: in every deps/, build/ and
# .fingerprint/ folder, an entry that a build wrote (anything in it newer than STAMP, a file
# touched before that build) replaces the older entries of the same crate and kind, which are
# removed. Entries of crates the build did not touch stay. At worst a removed entry is rebuilt.
#
#   bash tools/prune.sh TARGET_DIR STAMP
set -euo pipefail
dir=${1:?cargo target folder}
stamp=${2:?file touched before the build}

# libfoo_bar-0123abcd.rlib -> libfoo_bar.rlib; gguf-0123abcd -> gguf; foo-0123abcd/ -> foo
key() {
  local base=${1##*/} ext=""
  case $base in *.*) ext=".${base##*.}"; base=${base%.*} ;; esac
  echo "${base%-*}$ext"
}
fresh_entry() { [ -n "$(find "$1" -newer "$stamp" -print -quit)" ]; }

removed=0
freed=0
while IFS= read -r -d '' sub; do
  declare -A fresh=()
  old=()
  while IFS= read -r -d '' entry; do
    if fresh_entry "$entry"; then fresh[$(key "$entry")]=1; else old+=("$entry"); fi
  done < <(find "$sub" -mindepth 1 -maxdepth 1 -print0)
  for entry in "${old[@]}"; do
    if [ -n "${fresh[$(key "$entry")]:-}" ]; then
      freed=$((freed + $(du -sk "$entry" | cut -f1)))
      rm -rf "$entry"
      removed=$((removed + 1))
    fi
  done
  unset fresh
done < <(find "$dir" -mindepth 1 -maxdepth 3 -type d \( -name deps -o -name build -o -name .fingerprint \) -print0)
echo "pruned $dir: $removed stale entries, $((freed / 1024)) MB"
