#!/usr/bin/env bash
# Installs FineTune for the desktop on Linux: the binary, its demo files, a .desktop entry (so it is
# in the application menu and offered for .jsonl files), the icon in every hicolor size, and the
# JSON Lines MIME type.
#
#   packaging/linux/install.sh [--prefix DIR] [--binary PATH]
#
#   --prefix DIR   where to install (default: ~/.local; /usr/local for everyone, with sudo)
#   --binary PATH  the finetune binary to install (default: build target/release/finetune)
#   DESTDIR=DIR    stage under DIR for a distribution package (paths inside stay PREFIX's)
#
# Layout (PREFIX/lib/finetune keeps the binary next to its assets/, where the app looks for the
# demo; the command on PATH is a link to it):
#   PREFIX/lib/finetune/finetune, PREFIX/lib/finetune/assets/{demo-model,demo}
#   PREFIX/bin/finetune -> ../lib/finetune/finetune
#   PREFIX/share/applications/finetune.desktop
#   PREFIX/share/icons/hicolor/NxN/apps/finetune.png   (N = 16 32 48 64 128 256 512)
#   PREFIX/share/mime/packages/finetune.xml
# Uninstall: remove those paths.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX="${HOME:-}/.local"
BINARY=""
ICON_SIZES="16 32 48 64 128 256 512"

die() {
  echo "install: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix)
      [ $# -ge 2 ] || die "--prefix needs a folder"
      PREFIX="$2"
      shift
      ;;
    --binary)
      [ $# -ge 2 ] || die "--binary needs a path"
      BINARY="$2"
      shift
      ;;
    -h | --help)
      sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

case "$PREFIX" in
  /*) ;;
  *) die "--prefix must be an absolute path, not '$PREFIX'" ;;
esac
PREFIX="${PREFIX%/}"
DEST="${DESTDIR:-}$PREFIX"

if [ -z "$BINARY" ]; then
  BINARY="${CARGO_TARGET_DIR:-$ROOT/target}/release/finetune"
  echo "install: building $BINARY"
  (cd "$ROOT" && cargo build --release --locked --bin finetune)
fi
[ -f "$BINARY" ] || die "no binary at $BINARY"

LIB="$DEST/lib/finetune"
mkdir -p "$LIB/assets" "$DEST/bin" "$DEST/share/applications" "$DEST/share/mime/packages"
install -m 755 "$BINARY" "$LIB/finetune"
for dir in demo-model demo; do
  [ -d "$ROOT/assets/$dir" ] || die "missing runtime files: $ROOT/assets/$dir"
  rm -rf "${LIB:?}/assets/$dir"
  cp -R "$ROOT/assets/$dir" "$LIB/assets/$dir"
done
find "$LIB/assets" -type d -exec chmod 755 {} +
find "$LIB/assets" -type f -exec chmod 644 {} +
ln -sfn ../lib/finetune/finetune "$DEST/bin/finetune"

# The menu entry runs the installed binary by its full path: ~/.local/bin is often not on the
# PATH that the desktop session starts apps with.
EXEC="$PREFIX/bin/finetune"
case "$EXEC" in
  *[[:space:]\"\\\`\$]*) die "the desktop entry cannot run a path with spaces or quotes: $EXEC (pick another --prefix)" ;;
esac
sed -e "s|^Exec=finetune |Exec=$EXEC |" -e "s|^TryExec=finetune\$|TryExec=$EXEC|" \
  "$ROOT/packaging/linux/finetune.desktop" >"$DEST/share/applications/finetune.desktop"
chmod 644 "$DEST/share/applications/finetune.desktop"
install -m 644 "$ROOT/packaging/linux/finetune-mime.xml" "$DEST/share/mime/packages/finetune.xml"

for size in $ICON_SIZES; do
  dir="$DEST/share/icons/hicolor/${size}x${size}/apps"
  mkdir -p "$dir"
  install -m 644 "$ROOT/assets/icon/finetune-$size.png" "$dir/finetune.png"
done

# Refresh the desktop's caches for a live install (a package's own scripts do this for DESTDIR).
if [ -z "${DESTDIR:-}" ]; then
  if command -v update-mime-database >/dev/null 2>&1; then
    update-mime-database "$PREFIX/share/mime" >/dev/null 2>&1 || true
  fi
  if command -v update-desktop-database >/dev/null 2>&1; then
    update-desktop-database -q "$PREFIX/share/applications" || true
  fi
  if command -v gtk-update-icon-cache >/dev/null 2>&1 && [ -f "$PREFIX/share/icons/hicolor/index.theme" ]; then
    gtk-update-icon-cache -q -t "$PREFIX/share/icons/hicolor" || true
  fi
fi

echo "install: FineTune installed under ${DESTDIR:-}$PREFIX (run: $EXEC, or FineTune in the application menu)"
