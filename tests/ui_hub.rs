//! The Models panel's Hub search, driven through egui_kittest against the fake Hub of
//! tests/hub/fake.rs (a tiny HTTP/1.1 server on 127.0.0.1 written for the tests): typing a query
//! and Enter lists results, selecting a row shows its details, Download shows progress and then
//! makes the snapshot the chosen model, Cancel stops it, a gated model says where to accept its
//! license (and a token in the Settings field opens it), and offline the cached models stay
//! usable. The app is pointed at the fake with `FineTuneApp::with_hub`, keychain off, so nothing
//! here reads the process environment or the person's keychain.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "hub/fake.rs"]
#[allow(dead_code)] // tests/hub.rs uses the rest of it
mod fake;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;
use egui::accesskit::Role;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;

use fake::{FakeHub, COMMIT, GOOD_TOKEN};
use finetune::hub::{Cancel, Hub};
use finetune::ui::hub_worker::HubSetup;
use finetune::ui::{FineTuneApp, Settings};

type H = Harness<'static, FineTuneApp>;

fn app(endpoint: &str, cache: &Path, out: &Path) -> H {
    let settings = Settings {
        output_root: out.to_path_buf(),
        ..Settings::default()
    };
    let app = FineTuneApp::with_engine(settings, vec![], finetune::ui::real_engine()).with_hub(
        HubSetup {
            endpoint: Some(endpoint.to_owned()),
            cache_dir: Some(cache.to_path_buf()),
            keychain: false,
        },
    );
    // Tall enough that the whole model step is on screen (clicks land on what is visible).
    let mut h = Harness::builder()
        .with_size([1400.0, 1500.0])
        .build_eframe(|_cc| app);
    h.run();
    h
}

fn has_label(h: &H, text: &str) -> bool {
    h.query_all_by_label_contains(text).next().is_some()
}

/// Steps frames until `cond` holds (the Hub worker and the fake run on real threads).
fn wait_until(h: &mut H, what: &str, cond: impl Fn(&H) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond(h) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
    h.step();
}

/// Types `text` into the field labelled `label`, then presses Enter.
fn type_and_enter(h: &mut H, label: &str, text: &str) {
    h.get_by_label(label).focus();
    h.step();
    h.get_by_label(label).type_text(text);
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
}

fn snapshot(cache: &Path, repo: &str) -> PathBuf {
    cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}

fn chosen(h: &H, dir: &Path) -> bool {
    h.state().settings().model_dir.as_deref() == Some(dir)
        && h.state().model_summary().is_some_and(|s| s.dir == dir)
}

fn search(h: &mut H, fake: &FakeHub, text: &str, first_row: &str) {
    wait_until(h, "the Hub client", |h| {
        has_label(h, &format!("Hub: {}", fake.url))
    });
    type_and_enter(h, "Search:", text);
    wait_until(h, "the results", |h| h.query_by_label(first_row).is_some());
}

#[test]
fn search_select_download_and_choose() {
    let fake = FakeHub::start();
    // Slow enough to watch the progress bar, fast enough for a test.
    fake.behaviour.lock().unwrap().slow = Some(Duration::from_millis(25));
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut h = app(&fake.url, cache.path(), out.path());
    assert!(has_label(&h, "Search the Hugging Face Hub"));
    // The cache scan runs on a worker ("Scanning…" until it answers); on a busy machine it can
    // take longer than the first frames.
    wait_until(&mut h, "the empty cache list", |h| {
        has_label(h, "None found in the Hugging Face cache")
    });

    search(&mut h, &fake, "tiny", "org/tiny-llama");
    for repo in [
        "org/tiny-llama-sharded",
        "other/tiny-gpt2",
        "other/tiny-bert",
    ] {
        h.get_by_label(repo);
    }
    assert!(h.query_by_label("org/gated-llama").is_none());
    let log = fake.requests().join("\n");
    assert!(log.contains("search=tiny"), "{log}");
    assert!(log.contains("sort=downloads"), "{log}");
    // The table: architecture and trainable, with the reason for the one it cannot train.
    assert!(has_label(&h, "LlamaForCausalLM"));
    assert!(has_label(&h, "BertForMaskedLM"));
    assert!(h.query_all_by_label("yes").next().is_some());
    assert!(has_label(&h, "no: unsupported"));
    // Sizes and parameters arrive as the details of each row are prefetched.
    wait_until(&mut h, "the sizes", |h| {
        h.query_all_by_label("…").next().is_none()
    });
    assert!(has_label(&h, "146.2K"));
    assert!(has_label(&h, "607.8 KB"), "tiny-llama's training files");

    // Selecting a row shows its details.
    h.get_by_label("org/tiny-llama").click();
    wait_until(&mut h, "the details", |h| has_label(h, "Open on the Hub"));
    assert!(has_label(&h, "LlamaForCausalLM (llama)"));
    assert!(has_label(&h, "146.2K (F32)"));
    assert!(has_label(&h, "apache-2.0"));
    assert!(has_label(&h, "1.2K downloads, 7 likes"));
    assert!(has_label(&h, "yes (safetensors weights)"));
    assert!(has_label(&h, "Files to download (6)"));

    // Download: a progress bar with bytes and Cancel, then the snapshot is the chosen model.
    h.get_by_label("Download (607.8 KB)").click();
    wait_until(&mut h, "the progress bar", |h| {
        h.query_by_role(Role::ProgressIndicator).is_some_and(|p| {
            p.accesskit_node()
                .label()
                .is_some_and(|l| l.contains(" of 607.8 KB"))
        })
    });
    h.get_by_label("Cancel");
    let snap = snapshot(cache.path(), "org/tiny-llama");
    wait_until(&mut h, "the downloaded model to be chosen", |h| {
        chosen(h, &snap)
    });
    assert_eq!(h.state().model_summary().unwrap().name, "org/tiny-llama");
    assert!(has_label(&h, "Downloaded; it is now the chosen model"));
    assert!(h.query_by_role(Role::ProgressIndicator).is_none());
    // The local list was rescanned: the model is listed and the row offers the cached copy.
    wait_until(&mut h, "the rescan", |h| {
        has_label(h, "Use the downloaded copy")
    });
    assert!(!has_label(&h, "None found in the Hugging Face cache"));
    assert!(snap.join("model.safetensors").is_file());
}

#[test]
fn cancel_stops_the_download_and_the_next_one_finishes() {
    let fake = FakeHub::start();
    fake.behaviour.lock().unwrap().slow = Some(Duration::from_millis(40));
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut h = app(&fake.url, cache.path(), out.path());
    search(&mut h, &fake, "tiny-llama", "org/tiny-llama");
    h.get_by_label("org/tiny-llama").click();
    wait_until(&mut h, "the details", |h| {
        h.query_by_label_contains("Download (").is_some()
    });
    h.get_by_label_contains("Download (").click();
    wait_until(&mut h, "bytes to arrive", |h| {
        h.query_by_role(Role::ProgressIndicator).is_some_and(|p| {
            p.accesskit_node()
                .label()
                .is_some_and(|l| !l.starts_with("0 B of"))
        })
    });
    h.get_by_label("Cancel").click();
    wait_until(&mut h, "the cancel", |h| has_label(h, "download cancelled"));
    assert!(has_label(&h, "the next download resumes"));
    assert_eq!(h.state().settings().model_dir, None);

    fake.behaviour.lock().unwrap().slow = None;
    h.get_by_label_contains("Download (").click();
    let snap = snapshot(cache.path(), "org/tiny-llama");
    wait_until(&mut h, "the second download", |h| chosen(h, &snap));
    // The second request for the weights continued from the bytes the first one left.
    let log = fake.requests();
    assert!(
        log.iter()
            .any(|r| r.starts_with("GET /cdn/") && r.contains("[bytes=")),
        "{log:#?}"
    );
}

#[test]
fn a_gated_model_shows_the_license_link_and_a_token_opens_it() {
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut h = app(&fake.url, cache.path(), out.path());
    search(&mut h, &fake, "gated", "org/gated-llama");
    h.get_by_label("gated");
    h.get_by_label("org/gated-llama").click();
    wait_until(&mut h, "the details", |h| has_label(h, "Open on the Hub"));
    assert!(has_label(&h, "yes (manual): accept the license first"));
    h.get_by_label("Accept the license");

    h.get_by_label_contains("Download (").click();
    let url = format!("{}/org/gated-llama", fake.url);
    wait_until(&mut h, "the gated error", |h| {
        has_label(h, &format!("accept its license at {url}"))
    });
    h.get_by_label("Open the license page");
    assert_eq!(h.state().settings().model_dir, None);

    // A token with access, typed in the token field (the section opened itself), lets it through.
    type_and_enter(&mut h, "Hugging Face token:", GOOD_TOKEN);
    wait_until(&mut h, "the token", |h| {
        has_label(h, "Used until FineTune quits (the keychain is off).")
            && has_label(h, "In use: the token above.")
    });
    assert_eq!(h.state().settings().hf_token.get(), Some(GOOD_TOKEN));
    assert!(!format!("{:?}", h.state().settings()).contains(GOOD_TOKEN));
    h.get_by_label_contains("Download (").click();
    let snap = snapshot(cache.path(), "org/gated-llama");
    wait_until(&mut h, "the gated download", |h| chosen(h, &snap));
    // The token is never written with the settings.
    let saved = serde_json::to_string(h.state().settings()).unwrap();
    assert!(!saved.contains(GOOD_TOKEN));
}

#[test]
fn offline_the_cached_models_stay_listed_and_usable() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    {
        let fake = FakeHub::start();
        let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
        hub.download("org/tiny-llama", None, &mut |_| {}, &Cancel::new())
            .unwrap();
    }
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    let mut h = app(&dead, cache.path(), out.path());
    wait_until(&mut h, "the cache list and client", |h| {
        h.query_by_label("org/tiny-llama").is_some() && has_label(h, &format!("Hub: {dead}"))
    });
    type_and_enter(&mut h, "Search:", "tiny");
    wait_until(&mut h, "the network error", |h| {
        has_label(h, "cannot reach the Hub")
    });
    assert!(has_label(
        &h,
        "the downloaded models listed above still work"
    ));
    h.get_by_label("org/tiny-llama").click();
    let snap = snapshot(cache.path(), "org/tiny-llama");
    wait_until(&mut h, "the cached model to be chosen", |h| {
        chosen(h, &snap)
    });
}

/// Not a test: serves the fake Hub for a while so the real app can be pointed at it for
/// screenshots (`HF_ENDPOINT=<printed url> cargo run --example app`):
/// `FAKE_HUB_SECS=300 [FAKE_HUB_SLOW_MS=50] cargo test --test ui_hub -- --ignored --nocapture serve_fake_hub`.
#[test]
#[ignore = "a helper for screenshots; runs until FAKE_HUB_SECS pass"]
fn serve_fake_hub() {
    let fake = FakeHub::start();
    let slow_ms = std::env::var("FAKE_HUB_SLOW_MS")
        .ok()
        .and_then(|s| s.parse().ok());
    fake.behaviour.lock().unwrap().slow = slow_ms.map(Duration::from_millis);
    println!("fake Hub at {}", fake.url);
    if let Some(path) = std::env::var_os("FAKE_HUB_URL_FILE") {
        std::fs::write(path, &fake.url).unwrap();
    }
    let secs = std::env::var("FAKE_HUB_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    std::thread::sleep(Duration::from_secs(secs));
}
