#!/usr/bin/env bash
# Builds FineTune.app: the arm64 release binary with Metal, the bundle (Info.plist with the version
# from Cargo.toml, icon, demo model and dataset), code signing with the hardened runtime,
# notarization + stapling, and a DMG with an Applications link.
#
#   packaging/macos/build-app.sh [--universal] [--no-notarize] [--no-dmg] [--out DIR]
#   packaging/macos/build-app.sh --dry-run --binary PATH [--out DIR]
#
# --dry-run assembles the same bundle tree around any binary (e.g. a Linux target/debug/finetune)
# and stops before signing: it runs on any OS with bash, and tests/packaging.rs runs it.
#
# Environment (see packaging/README-sections.md, "Build the .app"):
#   FINETUNE_SIGN_IDENTITY   codesign identity, e.g. "Developer ID Application: Jane Doe (TEAMID1234)";
#                            unset: ad-hoc signature ("-"), which runs on this Mac but is not notarizable
#   notarization, first that is set wins (none set: not notarized):
#     FINETUNE_NOTARY_PROFILE                           a `xcrun notarytool store-credentials` profile
#     APPLE_API_KEY_PATH, APPLE_API_KEY_ID, APPLE_API_ISSUER_ID   App Store Connect API key (.p8)
#     APPLE_ID, APPLE_TEAM_ID, APPLE_APP_PASSWORD       Apple ID with an app-specific password
#   CARGO_TARGET_DIR         where cargo builds (default: ./target); the output goes to its macos/
#
# Works with macOS's /bin/bash 3.2: no associative arrays, no empty "${array[@]}" under set -u.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
APP_NAME="FineTune"
EXE_NAME="finetune"
ENTITLEMENTS="$ROOT/packaging/macos/entitlements.plist"
ICON="$ROOT/assets/icon/FineTune.icns"
# Runtime files the app looks for in Contents/Resources/assets (see ui::find_assets).
ASSET_DIRS="demo-model demo"

DRY_RUN=0
BINARY=""
OUT=""
UNIVERSAL=0
NOTARIZE=1
MAKE_DMG=1

usage() {
  sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
  echo "build-app: $*" >&2
  exit 1
}

note() {
  echo "build-app: $*"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --binary)
      [ $# -ge 2 ] || die "--binary needs a path"
      BINARY="$2"
      shift
      ;;
    --out)
      [ $# -ge 2 ] || die "--out needs a folder"
      OUT="$2"
      shift
      ;;
    --universal) UNIVERSAL=1 ;;
    --no-notarize) NOTARIZE=0 ;;
    --no-dmg) MAKE_DMG=0 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET_DIR/macos}"

# --- Version: Cargo.toml's [package] version, which the bundle must carry ---------------------------
VERSION="$(awk -F'"' '/^\[/ { section = $0 } section == "[package]" && /^version[[:space:]]*=/ { print $2; exit }' "$ROOT/Cargo.toml")"
[ -n "$VERSION" ] || die "no [package] version found in $ROOT/Cargo.toml"
# CFBundleVersion and CFBundleShortVersionString take only numbers and dots: drop a -pre/+build tail.
BUNDLE_VERSION="${VERSION%%[-+]*}"
case "$BUNDLE_VERSION" in
  *[!0-9.]* | "" | .* | *..* | *.) die "Cargo.toml's version '$VERSION' is not MAJOR.MINOR.PATCH" ;;
esac

plist_value() { # plist_value KEY FILE: the <string> after <key>KEY</key> (one per line, as Info.plist is)
  awk -v key="<key>$1</key>" 'found { sub(/.*<string>/, ""); sub(/<\/string>.*/, ""); print; exit } index($0, key) { found = 1 }' "$2"
}

for key in CFBundleShortVersionString CFBundleVersion; do
  have="$(plist_value "$key" "$ROOT/Info.plist")"
  if [ "$have" != "$BUNDLE_VERSION" ]; then
    note "warning: Info.plist has $key '$have', Cargo.toml says '$BUNDLE_VERSION'; the bundle gets '$BUNDLE_VERSION' (update Info.plist too: tests/packaging.rs checks it)"
  fi
done

# --- The binary ---------------------------------------------------------------------------------
if [ -n "$BINARY" ]; then
  [ -f "$BINARY" ] || die "no binary at $BINARY"
elif [ "$DRY_RUN" = 1 ]; then
  die "--dry-run needs --binary PATH (e.g. target/debug/finetune)"
else
  [ "$(uname -s)" = Darwin ] || die "building the .app needs macOS (use --dry-run --binary PATH elsewhere)"
  # The binary's minimum OS matches Info.plist's LSMinimumSystemVersion (Metal needs macOS 15).
  export MACOSX_DEPLOYMENT_TARGET=15.0
  TARGETS="aarch64-apple-darwin"
  [ "$UNIVERSAL" = 1 ] && TARGETS="aarch64-apple-darwin x86_64-apple-darwin"
  BUILT=""
  for target in $TARGETS; do
    note "building $EXE_NAME $VERSION for $target with Metal"
    (cd "$ROOT" && cargo build --release --locked --features metal --target "$target" --bin "$EXE_NAME")
    BUILT="$BUILT $TARGET_DIR/$target/release/$EXE_NAME"
  done
  if [ "$UNIVERSAL" = 1 ]; then
    BINARY="$TARGET_DIR/universal-apple-darwin/release/$EXE_NAME"
    mkdir -p "$(dirname "$BINARY")"
    # shellcheck disable=SC2086 # two paths without spaces
    lipo -create -output "$BINARY" $BUILT
  else
    BINARY="${BUILT# }"
  fi
fi

# --- The bundle ---------------------------------------------------------------------------------
APP="$OUT/$APP_NAME.app"
CONTENTS="$APP/Contents"
note "assembling $APP (version $BUNDLE_VERSION)"
rm -rf "$APP"
mkdir -p "$CONTENTS/MacOS" "$CONTENTS/Resources/assets"

cp "$BINARY" "$CONTENTS/MacOS/$EXE_NAME"
chmod 755 "$CONTENTS/MacOS/$EXE_NAME"

# Info.plist with both version strings set to Cargo.toml's (the line after each key).
awk -v v="$BUNDLE_VERSION" '
  fill { if (!sub(/<string>[^<]*<\/string>/, "<string>" v "</string>")) { exit 1 } fill = 0; filled++ }
  /<key>(CFBundleShortVersionString|CFBundleVersion)<\/key>/ { fill = 1 }
  { print }
  END { if (filled != 2) { exit 1 } }
' "$ROOT/Info.plist" >"$CONTENTS/Info.plist" || die "could not fill the versions into Info.plist (each key's <string> must be on the next line)"
printf 'APPL????' >"$CONTENTS/PkgInfo"

[ -f "$ICON" ] || die "no icon at $ICON (python3 packaging/icon/pack_icns.py builds it)"
cp "$ICON" "$CONTENTS/Resources/FineTune.icns"

for dir in $ASSET_DIRS; do
  [ -d "$ROOT/assets/$dir" ] || die "missing runtime files: $ROOT/assets/$dir"
  cp -R "$ROOT/assets/$dir" "$CONTENTS/Resources/assets/$dir"
done
# Finder litter would be sealed into the signature; leave it out.
find "$APP" -name .DS_Store -delete
find "$CONTENTS/Resources" -type d -exec chmod 755 {} +
find "$CONTENTS/Resources" -type f -exec chmod 644 {} +

if command -v plutil >/dev/null 2>&1; then
  plutil -lint "$CONTENTS/Info.plist" >/dev/null || die "Info.plist does not parse: $CONTENTS/Info.plist"
fi

if [ "$DRY_RUN" = 1 ]; then
  if [ -n "${FINETUNE_SIGN_IDENTITY:-}" ]; then
    note "dry run: would sign with '$FINETUNE_SIGN_IDENTITY', notarize when credentials are set, and build the DMG"
  else
    note "dry run: would sign ad-hoc and build the DMG"
  fi
  note "dry run: bundle at $APP"
  exit 0
fi

[ "$(uname -s)" = Darwin ] || die "signing, notarizing and the DMG need macOS (use --dry-run elsewhere)"

# --- Signing ------------------------------------------------------------------------------------
IDENTITY="${FINETUNE_SIGN_IDENTITY:--}"
xattr -cr "$APP"
if [ "$IDENTITY" = "-" ]; then
  note "signing ad-hoc (set FINETUNE_SIGN_IDENTITY to a Developer ID to distribute)"
  TIMESTAMP="--timestamp=none"
else
  note "signing with '$IDENTITY'"
  TIMESTAMP="--timestamp"
fi
# One Mach-O (the main executable), so signing the bundle signs it; no --deep needed.
codesign --force --options runtime --entitlements "$ENTITLEMENTS" "$TIMESTAMP" --sign "$IDENTITY" "$APP"
codesign --verify --strict --verbose=2 "$APP"

# --- Notarization -------------------------------------------------------------------------------
NOTARY=""
if [ "$NOTARIZE" = 1 ]; then
  if [ -n "${FINETUNE_NOTARY_PROFILE:-}" ]; then
    NOTARY="profile"
  elif [ -n "${APPLE_API_KEY_PATH:-}" ]; then
    : "${APPLE_API_KEY_ID:?APPLE_API_KEY_PATH is set: set APPLE_API_KEY_ID too}"
    : "${APPLE_API_ISSUER_ID:?APPLE_API_KEY_PATH is set: set APPLE_API_ISSUER_ID too}"
    NOTARY="api-key"
  elif [ -n "${APPLE_ID:-}" ]; then
    : "${APPLE_TEAM_ID:?APPLE_ID is set: set APPLE_TEAM_ID too}"
    : "${APPLE_APP_PASSWORD:?APPLE_ID is set: set APPLE_APP_PASSWORD (an app-specific password) too}"
    NOTARY="apple-id"
  fi
  if [ -n "$NOTARY" ] && [ "$IDENTITY" = "-" ]; then
    die "notarization needs a Developer ID signature: set FINETUNE_SIGN_IDENTITY (or pass --no-notarize)"
  fi
fi

notarize() { # notarize FILE: submit, wait, and fail with Apple's log unless accepted
  local file="$1" out id
  note "notarizing $(basename "$file") (this takes a few minutes)"
  case "$NOTARY" in
    profile) out="$(xcrun notarytool submit "$file" --keychain-profile "$FINETUNE_NOTARY_PROFILE" --wait --output-format json)" || true ;;
    api-key) out="$(xcrun notarytool submit "$file" --key "$APPLE_API_KEY_PATH" --key-id "$APPLE_API_KEY_ID" --issuer "$APPLE_API_ISSUER_ID" --wait --output-format json)" || true ;;
    apple-id) out="$(xcrun notarytool submit "$file" --apple-id "$APPLE_ID" --team-id "$APPLE_TEAM_ID" --password "$APPLE_APP_PASSWORD" --wait --output-format json)" || true ;;
  esac
  echo "$out"
  if ! printf '%s' "$out" | grep -Eq '"status"[[:space:]]*:[[:space:]]*"Accepted"'; then
    id="$(printf '%s' "$out" | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
    if [ -n "$id" ]; then
      case "$NOTARY" in
        profile) xcrun notarytool log "$id" --keychain-profile "$FINETUNE_NOTARY_PROFILE" || true ;;
        api-key) xcrun notarytool log "$id" --key "$APPLE_API_KEY_PATH" --key-id "$APPLE_API_KEY_ID" --issuer "$APPLE_API_ISSUER_ID" || true ;;
        apple-id) xcrun notarytool log "$id" --apple-id "$APPLE_ID" --team-id "$APPLE_TEAM_ID" --password "$APPLE_APP_PASSWORD" || true ;;
      esac
    fi
    die "notarization of $file was not accepted (Apple's log above)"
  fi
}

if [ -n "$NOTARY" ]; then
  # The app first, so its own ticket is stapled and it opens offline after being copied out.
  ZIP="$OUT/$APP_NAME-notarize.zip"
  rm -f "$ZIP"
  ditto -c -k --keepParent "$APP" "$ZIP"
  notarize "$ZIP"
  rm -f "$ZIP"
  xcrun stapler staple "$APP"
  xcrun stapler validate "$APP"
  spctl --assess --type execute --verbose=2 "$APP"
elif [ "$NOTARIZE" = 1 ]; then
  note "not notarizing: no credentials set (see --help)"
fi

# --- DMG ----------------------------------------------------------------------------------------
if [ "$MAKE_DMG" = 1 ]; then
  ARCH="arm64"
  [ "$UNIVERSAL" = 1 ] && ARCH="universal"
  DMG="$OUT/$APP_NAME-$VERSION-$ARCH.dmg"
  STAGE="$OUT/dmg"
  rm -rf "$STAGE" "$DMG"
  mkdir -p "$STAGE"
  # ditto keeps the signature and the stapled ticket intact.
  ditto "$APP" "$STAGE/$APP_NAME.app"
  ln -s /Applications "$STAGE/Applications"
  note "building $DMG"
  # hdiutil now and then fails with "Resource busy" on CI machines; a retry gets past it.
  for attempt in 1 2 3; do
    if hdiutil create -volname "$APP_NAME" -srcfolder "$STAGE" -ov -format UDZO "$DMG"; then
      break
    fi
    [ "$attempt" = 3 ] && die "hdiutil could not create $DMG"
    sleep 5
  done
  rm -rf "$STAGE"
  if [ "$IDENTITY" != "-" ]; then
    codesign --force --timestamp --sign "$IDENTITY" "$DMG"
  fi
  if [ -n "$NOTARY" ]; then
    notarize "$DMG"
    xcrun stapler staple "$DMG"
    xcrun stapler validate "$DMG"
  fi
  note "done: $DMG"
else
  note "done: $APP"
fi
