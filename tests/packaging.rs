//! Packaging: the top-level Info.plist (every key the macOS bundle needs, the version matching
//! Cargo.toml), the icon files, `packaging/macos/build-app.sh --dry-run` (the exact FineTune.app
//! tree around the built binary) and `packaging/linux/install.sh` (desktop entry, icons, MIME type).
#![cfg(unix)]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use plist::{Dictionary, Value};

const BIN: &str = env!("CARGO_BIN_EXE_finetune");
/// The UTI Info.plist declares for `.jsonl`.
const JSONL_UTI: &str = "org.jsonlines.jsonl";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo.toml's version as a bundle carries it (numbers and dots: a -pre/+build tail dropped, as
/// build-app.sh does).
fn bundle_version() -> &'static str {
    let v = env!("CARGO_PKG_VERSION");
    v.split(['-', '+']).next().unwrap_or(v)
}

fn load_plist(path: &Path) -> Dictionary {
    Value::from_file(path)
        .unwrap_or_else(|e| panic!("{} does not parse as a plist: {e}", path.display()))
        .into_dictionary()
        .unwrap_or_else(|| panic!("{} is not a dictionary at the top", path.display()))
}

fn string<'a>(d: &'a Dictionary, key: &str) -> &'a str {
    d.get(key)
        .and_then(Value::as_string)
        .unwrap_or_else(|| panic!("Info.plist: {key} is missing or not a string"))
}

fn array<'a>(d: &'a Dictionary, key: &str) -> &'a [Value] {
    d.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("Info.plist: {key} is missing or not an array"))
}

fn strings(d: &Dictionary, key: &str) -> Vec<String> {
    array(d, key)
        .iter()
        .map(|v| {
            v.as_string()
                .unwrap_or_else(|| panic!("Info.plist: {key} holds a non-string"))
                .to_string()
        })
        .collect()
}

fn dicts<'a>(d: &'a Dictionary, key: &str) -> Vec<&'a Dictionary> {
    array(d, key)
        .iter()
        .map(|v| {
            v.as_dictionary()
                .unwrap_or_else(|| panic!("Info.plist: {key} holds a non-dictionary"))
        })
        .collect()
}

#[test]
fn info_plist_has_every_key_the_bundle_needs() {
    let info = load_plist(&root().join("Info.plist"));

    assert_eq!(string(&info, "CFBundleName"), "FineTune");
    assert_eq!(string(&info, "CFBundleDisplayName"), "FineTune");
    assert_eq!(string(&info, "CFBundleIdentifier"), "app.finetune.FineTune");
    assert_eq!(string(&info, "CFBundlePackageType"), "APPL");
    assert_eq!(string(&info, "CFBundleInfoDictionaryVersion"), "6.0");

    // The executable is the cargo binary, under its own name.
    let exe = string(&info, "CFBundleExecutable");
    assert_eq!(
        Path::new(BIN).file_name().and_then(|n| n.to_str()),
        Some(exe)
    );

    let icon = string(&info, "CFBundleIconFile");
    assert_eq!(icon, "FineTune.icns");
    assert!(root().join("assets/icon").join(icon).is_file());

    // Candle's Metal backend needs MTLResidencySet (macOS 15).
    assert_eq!(string(&info, "LSMinimumSystemVersion"), "15.0");
    assert_eq!(
        info.get("NSHighResolutionCapable")
            .and_then(Value::as_boolean),
        Some(true)
    );
    assert_eq!(
        string(&info, "LSApplicationCategoryType"),
        "public.app-category.developer-tools"
    );

    // .jsonl files: a document type FineTune views (offered, never the default app)...
    let docs = dicts(&info, "CFBundleDocumentTypes");
    let jsonl_doc = docs
        .iter()
        .find(|d| {
            strings(d, "LSItemContentTypes")
                .iter()
                .any(|t| t == JSONL_UTI)
        })
        .expect("a CFBundleDocumentTypes entry for .jsonl");
    assert_eq!(string(jsonl_doc, "CFBundleTypeRole"), "Viewer");
    assert_eq!(string(jsonl_doc, "LSHandlerRank"), "Alternate");
    assert!(!string(jsonl_doc, "CFBundleTypeName").is_empty());
    // ...and model folders, dropped on the Dock icon.
    let folder_doc = docs
        .iter()
        .find(|d| {
            strings(d, "LSItemContentTypes")
                .iter()
                .any(|t| t == "public.folder")
        })
        .expect("a CFBundleDocumentTypes entry for folders");
    assert_eq!(string(folder_doc, "LSHandlerRank"), "Alternate");

    // ...whose type is imported (FineTune does not own the format), as JSON and plain text.
    let imported = dicts(&info, "UTImportedTypeDeclarations");
    let jsonl = imported
        .iter()
        .find(|d| string(d, "UTTypeIdentifier") == JSONL_UTI)
        .expect("a UTImportedTypeDeclarations entry for the .jsonl UTI");
    let conforms = strings(jsonl, "UTTypeConformsTo");
    for parent in ["public.json", "public.plain-text"] {
        assert!(
            conforms.iter().any(|c| c == parent),
            "{JSONL_UTI} must conform to {parent}: {conforms:?}"
        );
    }
    let tags = jsonl
        .get("UTTypeTagSpecification")
        .and_then(Value::as_dictionary)
        .expect("UTTypeTagSpecification");
    assert_eq!(strings(tags, "public.filename-extension"), vec!["jsonl"]);
    assert!(strings(tags, "public.mime-type").contains(&"application/jsonl".to_string()));
    assert!(
        info.get("UTExportedTypeDeclarations").is_none(),
        "FineTune must import the .jsonl type, not export (own) it"
    );
}

#[test]
fn info_plist_version_matches_cargo_toml() {
    let info = load_plist(&root().join("Info.plist"));
    for key in ["CFBundleShortVersionString", "CFBundleVersion"] {
        assert_eq!(
            string(&info, key),
            bundle_version(),
            "Info.plist's {key} must be Cargo.toml's version (update both together)"
        );
    }
}

/// (width, height) from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// The (type, data) entries of an .icns file, checking its framing.
fn icns_entries(bytes: &[u8]) -> Vec<([u8; 4], &[u8])> {
    assert_eq!(&bytes[..4], b"icns", "not an .icns file");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    assert_eq!(be(&bytes[4..8]), bytes.len(), "icns length field");
    let mut entries = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let kind: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        let len = be(&bytes[at + 4..at + 8]);
        assert!(len >= 8 && at + len <= bytes.len(), "bad icns entry length");
        entries.push((kind, &bytes[at + 8..at + len]));
        at += len;
    }
    entries
}

#[test]
fn icon_master_is_1024_and_the_icns_is_built_from_it() {
    let icon_dir = root().join("assets/icon");
    let master = fs::read(icon_dir.join("finetune-1024.png")).unwrap();
    assert_eq!(png_size(&master), (1024, 1024));
    // Colour type 6: RGBA, so the rounded corners are transparent.
    assert_eq!(master[25], 6, "the master icon must be RGBA");

    let icns = fs::read(icon_dir.join("FineTune.icns")).unwrap();
    let entries = icns_entries(&icns);
    let expected = [
        (*b"icp4", 16),
        (*b"icp5", 32),
        (*b"ic11", 32),
        (*b"ic12", 64),
        (*b"ic07", 128),
        (*b"ic13", 256),
        (*b"ic08", 256),
        (*b"ic14", 512),
        (*b"ic09", 512),
        (*b"ic10", 1024),
    ];
    for (kind, size) in expected {
        let (_, data) = entries.iter().find(|(k, _)| *k == kind).unwrap_or_else(|| {
            panic!(
                "FineTune.icns has no {} entry",
                String::from_utf8_lossy(&kind)
            )
        });
        assert_eq!(
            png_size(data),
            (size, size),
            "{}",
            String::from_utf8_lossy(&kind)
        );
        let rendering = fs::read(icon_dir.join(format!("finetune-{size}.png"))).unwrap();
        assert!(
            *data == rendering.as_slice(),
            "FineTune.icns is stale: run python3 packaging/icon/pack_icns.py"
        );
    }
    let toc = entries.iter().find(|(k, _)| k == b"TOC ").expect("a TOC");
    assert_eq!(toc.1.len(), 8 * expected.len());

    // The Linux hicolor sizes.
    for size in [16, 32, 48, 64, 128, 256, 512] {
        let png = fs::read(icon_dir.join(format!("finetune-{size}.png"))).unwrap();
        assert_eq!(png_size(&png), (size, size));
    }
}

/// Every file and folder under `dir`, as paths relative to it with `/` separators.
fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            out.insert(rel);
            if meta.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// `prefix`, and `prefix/<each entry>` of the source folder `src`.
fn with_prefix(prefix: &str, src: &Path) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = tree(src)
        .into_iter()
        .map(|p| format!("{prefix}/{p}"))
        .collect();
    out.insert(prefix.to_string());
    out
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("bash runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn build_app(root: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("packaging/macos/build-app.sh"));
    cmd.env_remove("FINETUNE_SIGN_IDENTITY");
    cmd
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).unwrap().permissions().mode() & 0o111 == 0o111
}

#[test]
fn macos_dry_run_assembles_the_exact_bundle() {
    let out = tempfile::tempdir().unwrap();
    run(build_app(root())
        .args(["--dry-run", "--binary", BIN, "--out"])
        .arg(out.path()));

    let app = out.path().join("FineTune.app");
    let mut expected: BTreeSet<String> = [
        "Contents",
        "Contents/Info.plist",
        "Contents/PkgInfo",
        "Contents/MacOS",
        "Contents/MacOS/finetune",
        "Contents/Resources",
        "Contents/Resources/FineTune.icns",
        "Contents/Resources/assets",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // The demo the app looks for in Contents/Resources/assets (ui::find_assets), file for file.
    expected.extend(with_prefix(
        "Contents/Resources/assets/demo-model",
        &root().join("assets/demo-model"),
    ));
    expected.extend(with_prefix(
        "Contents/Resources/assets/demo",
        &root().join("assets/demo"),
    ));
    for must in [
        "Contents/Resources/assets/demo-model/config.json",
        "Contents/Resources/assets/demo-model/model.safetensors",
        "Contents/Resources/assets/demo-model/tokenizer.json",
        "Contents/Resources/assets/demo/train.jsonl",
    ] {
        assert!(expected.contains(must), "the demo lost {must}");
    }
    assert_eq!(tree(&app), expected);

    // The executable: the built binary, runnable.
    let exe = app.join("Contents/MacOS/finetune");
    assert!(is_executable(&exe));
    assert_eq!(
        fs::metadata(&exe).unwrap().len(),
        fs::metadata(BIN).unwrap().len()
    );
    let version = run(Command::new(&exe).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    // Info.plist: valid, the top-level one with the version filled in, naming files that exist.
    let info = load_plist(&app.join("Contents/Info.plist"));
    assert_eq!(info, load_plist(&root().join("Info.plist")));
    assert_eq!(
        string(&info, "CFBundleShortVersionString"),
        bundle_version()
    );
    assert_eq!(string(&info, "CFBundleVersion"), bundle_version());
    assert!(app
        .join("Contents/MacOS")
        .join(string(&info, "CFBundleExecutable"))
        .is_file());
    let icon = app
        .join("Contents/Resources")
        .join(string(&info, "CFBundleIconFile"));
    assert_eq!(
        fs::read(&icon).unwrap(),
        fs::read(root().join("assets/icon/FineTune.icns")).unwrap()
    );
    assert_eq!(fs::read(app.join("Contents/PkgInfo")).unwrap(), b"APPL????");
    assert_eq!(
        fs::read(app.join("Contents/Resources/assets/demo/train.jsonl")).unwrap(),
        fs::read(root().join("assets/demo/train.jsonl")).unwrap()
    );
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &to);
        } else {
            fs::copy(&path, &to).unwrap();
        }
    }
}

/// A copy of the files build-app.sh reads, to run it against a changed Cargo.toml or Info.plist.
fn scratch_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "Cargo.toml",
        "Info.plist",
        "packaging/macos/build-app.sh",
        "packaging/macos/entitlements.plist",
        "assets/icon/FineTune.icns",
    ] {
        let to = dir.path().join(file);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(root().join(file), to).unwrap();
    }
    for folder in ["assets/demo-model", "assets/demo"] {
        copy_dir(&root().join(folder), &dir.path().join(folder));
    }
    dir
}

fn fake_binary(dir: &Path) -> PathBuf {
    let path = dir.join("finetune-fake");
    fs::write(&path, "#!/bin/sh\necho fake\n").unwrap();
    path
}

#[test]
fn macos_dry_run_fills_the_version_from_cargo_toml() {
    let scratch = scratch_root();
    let cargo = scratch.path().join("Cargo.toml");
    let toml = fs::read_to_string(&cargo).unwrap();
    let old = format!("version = \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(toml.contains(&old));
    // A pre-release version: the bundle takes its numeric part.
    fs::write(&cargo, toml.replacen(&old, "version = \"7.8.9-beta.1\"", 1)).unwrap();

    let out = scratch.path().join("out");
    let binary = fake_binary(scratch.path());
    let done = run(build_app(scratch.path())
        .args(["--dry-run", "--binary"])
        .arg(&binary)
        .arg("--out")
        .arg(&out));
    let log = String::from_utf8_lossy(&done.stdout);
    assert!(
        log.contains("warning: Info.plist has CFBundleVersion"),
        "a stale Info.plist is reported: {log}"
    );

    let info = load_plist(&out.join("FineTune.app/Contents/Info.plist"));
    assert_eq!(string(&info, "CFBundleShortVersionString"), "7.8.9");
    assert_eq!(string(&info, "CFBundleVersion"), "7.8.9");
    // Everything else is untouched.
    let mut top = load_plist(&root().join("Info.plist"));
    for key in ["CFBundleShortVersionString", "CFBundleVersion"] {
        top.insert(key.into(), Value::String("7.8.9".into()));
    }
    assert_eq!(info, top);
    assert!(is_executable(
        &out.join("FineTune.app/Contents/MacOS/finetune")
    ));
}

#[test]
fn macos_dry_run_needs_a_binary() {
    let out = tempfile::tempdir().unwrap();
    let done = build_app(root())
        .args(["--dry-run", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!done.status.success());
    assert!(String::from_utf8_lossy(&done.stderr).contains("--dry-run needs --binary PATH"));
    assert!(!out.path().join("FineTune.app").exists());
}

/// `key=value` lines of the [Desktop Entry] group.
fn desktop_entry(text: &str) -> Vec<(String, String)> {
    assert_eq!(text.lines().next(), Some("[Desktop Entry]"));
    text.lines()
        .skip(1)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn linux_install_puts_the_desktop_entry_icons_and_mime_type_in_place() {
    let destdir = tempfile::tempdir().unwrap();
    run(Command::new("bash")
        .arg(root().join("packaging/linux/install.sh"))
        .args(["--prefix", "/usr", "--binary", BIN])
        .env("DESTDIR", destdir.path()));
    let usr = destdir.path().join("usr");

    let mut expected: BTreeSet<String> = [
        "bin",
        "bin/finetune",
        "lib",
        "lib/finetune",
        "lib/finetune/finetune",
        "lib/finetune/assets",
        "share",
        "share/applications",
        "share/applications/finetune.desktop",
        "share/mime",
        "share/mime/packages",
        "share/mime/packages/finetune.xml",
        "share/icons",
        "share/icons/hicolor",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for size in [16, 32, 48, 64, 128, 256, 512] {
        let dir = format!("share/icons/hicolor/{size}x{size}");
        expected.insert(dir.clone());
        expected.insert(format!("{dir}/apps"));
        expected.insert(format!("{dir}/apps/finetune.png"));
        assert_eq!(
            fs::read(usr.join(format!("{dir}/apps/finetune.png"))).unwrap(),
            fs::read(root().join(format!("assets/icon/finetune-{size}.png"))).unwrap()
        );
    }
    expected.extend(with_prefix(
        "lib/finetune/assets/demo-model",
        &root().join("assets/demo-model"),
    ));
    expected.extend(with_prefix(
        "lib/finetune/assets/demo",
        &root().join("assets/demo"),
    ));
    assert_eq!(tree(&usr), expected);

    // The command is a relative link to the binary that sits next to its assets/.
    assert_eq!(
        fs::read_link(usr.join("bin/finetune")).unwrap(),
        Path::new("../lib/finetune/finetune")
    );
    assert!(is_executable(&usr.join("lib/finetune/finetune")));
    let version = run(Command::new(usr.join("bin/finetune")).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    let desktop_path = usr.join("share/applications/finetune.desktop");
    let entry = desktop_entry(&fs::read_to_string(&desktop_path).unwrap());
    let get = |key: &str| {
        entry
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("finetune.desktop has no {key}"))
    };
    assert_eq!(get("Type"), "Application");
    assert_eq!(get("Name"), "FineTune");
    // The installed path (not DESTDIR's), with the dropped/opened files as arguments.
    assert_eq!(get("Exec"), "/usr/bin/finetune %F");
    assert_eq!(get("TryExec"), "/usr/bin/finetune");
    assert_eq!(get("Icon"), "finetune");
    assert_eq!(get("Terminal"), "false");
    assert!(get("MimeType").split(';').any(|m| m == "application/jsonl"));
    // The window's app id (Wayland) / WM_CLASS (X11) ties the window to this entry and its icon.
    let app_id = finetune::ui::native_options().viewport.app_id;
    assert_eq!(Some(get("StartupWMClass")), app_id.as_deref());
    assert_eq!(
        desktop_path.file_stem().and_then(|s| s.to_str()),
        app_id.as_deref()
    );

    let mime = fs::read_to_string(usr.join("share/mime/packages/finetune.xml")).unwrap();
    assert!(mime.contains(r#"<mime-type type="application/jsonl">"#));
    assert!(mime.contains(r#"<glob pattern="*.jsonl"/>"#));

    // The freedesktop validator, where it is installed (.ci/run installs desktop-file-utils).
    let validator = Command::new("desktop-file-validate")
        .arg(&desktop_path)
        .output();
    match validator {
        Ok(out) => assert!(
            out.status.success(),
            "desktop-file-validate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) if cfg!(target_os = "linux") && std::env::var_os("CI").is_some() => {
            panic!("desktop-file-validate is missing: CI installs desktop-file-utils (apt)")
        }
        Err(_) => eprintln!("desktop-file-validate not installed: skipped that check"),
    }
}
