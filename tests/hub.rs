//! Hub search, details and downloads against a fake Hub on 127.0.0.1 (tests/hub/fake.rs, a tiny
//! HTTP/1.1 server written for these tests) answering the endpoints hf-hub and FineTune call:
//! search, model info, the file tree, resolve with ETag / X-Repo-Commit / Content-Length / Range,
//! 401/403 for a gated repo, 404s, and a connection dropped mid-file. Each test passes its
//! endpoint and cache explicitly; one test checks that `HF_ENDPOINT` and `HF_HOME` alone point
//! the app at it.
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "hub/fake.rs"]
mod fake;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use fake::{fixture, FakeHub, COMMIT, GOOD_TOKEN};
use finetune::hub::{
    cached_models, cached_snapshot, Cancel, DownloadEvent, Hub, HubError, HubOptions, SearchQuery,
    SearchSort,
};

fn collect(
    hub: &Hub,
    repo: &str,
    cancel: &Cancel,
) -> (Result<PathBuf, HubError>, Vec<DownloadEvent>) {
    let mut events = Vec::new();
    let r = hub.download(repo, None, &mut |e| events.push(e), cancel);
    (r, events)
}

#[test]
fn search_results_parse_and_filter() {
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    // The app shares one Hub between its UI and download threads.
    fn shareable<T: Send + Sync>(_: &T) {}
    shareable(&hub);
    let rows = hub
        .search(&SearchQuery {
            text: "tiny".into(),
            sort: SearchSort::Likes,
            ..Default::default()
        })
        .unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.repo.as_str()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[0], "org/tiny-llama");
    let llama = &rows[0];
    assert_eq!(llama.architecture.as_deref(), Some("LlamaForCausalLM"));
    assert_eq!((llama.downloads, llama.likes), (1234, 7));
    assert!(llama.supported.is_ok());
    let bert = rows.iter().find(|r| r.repo == "other/tiny-bert").unwrap();
    let why = bert.supported.clone().unwrap_err();
    assert!(
        why.contains("BertForMaskedLM") && why.contains("LlamaForCausalLM"),
        "{why}"
    );
    let table = finetune::hub::format_rows(&rows);
    assert!(table.starts_with("MODEL"), "{table}");
    assert!(
        table.contains("org/tiny-llama") && table.contains("no: BertForMaskedLM"),
        "{table}"
    );

    let supported = hub
        .search(&SearchQuery {
            text: "tiny".into(),
            author: Some("other".into()),
            supported_only: true,
            limit: 5,
            ..Default::default()
        })
        .unwrap();
    let ids: Vec<&str> = supported.iter().map(|r| r.repo.as_str()).collect();
    assert_eq!(ids, ["other/tiny-gpt2"]);
    let log = fake.requests().join("\n");
    assert!(log.contains("sort=likes"), "{log}");
    assert!(log.contains("pipeline_tag=text-generation"), "{log}");
    assert!(log.contains("author=other"), "{log}");
}

#[test]
fn details_read_architecture_parameters_size_and_gating() {
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let d = hub.details("org/tiny-llama", None).unwrap();
    assert_eq!(d.architecture.as_deref(), Some("LlamaForCausalLM"));
    assert_eq!(d.parameters, Some(146_240));
    assert_eq!(d.commit.as_deref(), Some(COMMIT));
    assert_eq!(d.license.as_deref(), Some("apache-2.0"));
    assert_eq!(d.gated, None);
    assert!(d.supported.is_ok());
    let names: Vec<&str> = d.files.iter().map(|f| f.path.as_str()).collect();
    assert!(
        names.contains(&"model.safetensors") && !names.contains(&"README.md"),
        "{names:?}"
    );
    let expected: u64 = ["model.safetensors", "config.json", "tokenizer.json"]
        .iter()
        .map(|f| {
            std::fs::metadata(fixture("tiny-llama").join(f))
                .unwrap()
                .len()
        })
        .sum();
    assert!(d.download_bytes > expected, "{}", d.download_bytes);
    assert!(d.summary().contains("LlamaForCausalLM"));

    let g = hub.details("org/gated-llama", Some("main")).unwrap();
    assert_eq!(g.gated.as_deref(), Some("manual"));
    assert!(g
        .summary()
        .contains(&format!("{}/org/gated-llama", fake.url)));

    let e = hub.details("org/nope", None).unwrap_err();
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e}");
    let e = hub.details("org/tiny-llama", Some("v9")).unwrap_err();
    assert!(matches!(e, HubError::RevisionNotFound { .. }), "{e}");
}

#[test]
fn download_lands_in_the_python_cache_layout_and_loads() {
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let (snap, events) = collect(&hub, "org/tiny-llama", &Cancel::new());
    let snap = snap.unwrap();
    let repo_dir = cache.path().join("models--org--tiny-llama");
    assert_eq!(snap, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        let link = snap.join(f);
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.starts_with("../../blobs"), "{f}: {target:?}");
        assert_eq!(
            std::fs::read(&link).unwrap(),
            std::fs::read(fixture("tiny-llama").join(f)).unwrap(),
            "{f}"
        );
    }
    // The weights blob is named by the linked (LFS) ETag, as huggingface_hub names it.
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(blobs.iter().any(|b| b.len() == 64), "{blobs:?}");
    assert!(
        !blobs.iter().any(|b| b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    assert!(!snap.join("README.md").exists() && !snap.join("onnx").exists());

    // Progress: planned, per-file starts, byte counts rising to the total, done.
    let DownloadEvent::Planned {
        total_bytes, files, ..
    } = &events[0]
    else {
        panic!("{:?}", events[0])
    };
    assert_eq!(files.last().unwrap().path, "config.json");
    let progress: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            DownloadEvent::Progress(p) => Some(p.done_bytes),
            _ => None,
        })
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(total_bytes));
    assert!(matches!(events.last(), Some(DownloadEvent::Done { .. })));

    // The snapshot is a loadable model, listed offline, found by repo id.
    finetune::model::Model::load(&snap, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let listed = cached_models(cache.path());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].repo_id, "org/tiny-llama");
    assert!(listed[0].is_main);
    assert_eq!(
        cached_snapshot(cache.path(), "org/tiny-llama", None),
        Some(snap.clone())
    );

    // A second download finds every file cached and sends no GET.
    let before = fake.requests().len();
    let (again, events) = collect(&hub, "org/tiny-llama", &Cancel::new());
    assert_eq!(again.unwrap(), snap);
    assert!(events
        .iter()
        .all(|e| !matches!(e, DownloadEvent::FileDone { cached: false, .. })));
    assert!(fake.requests()[before..]
        .iter()
        .all(|r| !r.starts_with("GET /org")));
}

#[test]
fn a_dropped_connection_resumes_with_a_range_request() {
    let fake = FakeHub::start();
    fake.behaviour
        .lock()
        .unwrap()
        .drop_first
        .push("model.safetensors".into());
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let (snap, events) = collect(&hub, "org/tiny-llama", &Cancel::new());
    let snap = snap.unwrap();
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap()
    );
    assert!(
        events.iter().any(
            |e| matches!(e, DownloadEvent::Retrying { file, .. } if file == "model.safetensors")
        ),
        "{events:?}"
    );
    let log = fake.requests();
    let size = std::fs::metadata(fixture("tiny-llama/model.safetensors"))
        .unwrap()
        .len();
    let resumed = log
        .iter()
        .find(|r| r.starts_with("GET /cdn/") && r.contains("[bytes="))
        .unwrap_or_else(|| panic!("no ranged GET in {log:#?}"));
    let from: u64 = resumed
        .split("[bytes=")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(from > 0 && from < size, "{resumed}");
}

/// Issue 20: a mirror sends `X-Linked-Size` (the whole file) on its 206 answers; the resumed
/// download must append from where it stopped, not mistake the 206 for a whole file.
#[test]
fn a_mirror_sending_x_linked_size_on_206_still_resumes() {
    let fake = FakeHub::start();
    {
        let mut b = fake.behaviour.lock().unwrap();
        b.mirror = true;
        b.drop_first.push("model.safetensors".into());
    }
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let (snap, events) = collect(&hub, "org/tiny-llama", &Cancel::new());
    let snap = snap.unwrap();
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap()
    );
    let retries = events
        .iter()
        .filter(
            |e| matches!(e, DownloadEvent::Retrying { file, .. } if file == "model.safetensors"),
        )
        .count();
    assert_eq!(retries, 1, "{events:?}");
    let log = fake.requests();
    let ranged: Vec<&String> = log
        .iter()
        .filter(|r| r.starts_with("GET /org/tiny-llama/resolve/") && r.contains("[bytes="))
        .collect();
    assert_eq!(ranged.len(), 1, "{log:#?}");
    assert!(!log.iter().any(|r| r.starts_with("GET /cdn/")), "{log:#?}");
}

/// A server that ignores the Range answers 200 with the whole file: written from the start.
#[test]
fn a_server_ignoring_the_range_gets_the_file_written_from_the_start() {
    let fake = FakeHub::start();
    {
        let mut b = fake.behaviour.lock().unwrap();
        b.drop_first.push("model.safetensors".into());
        b.ignore_range.push("model.safetensors".into());
    }
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let (snap, _) = collect(&hub, "org/tiny-llama", &Cancel::new());
    assert_eq!(
        std::fs::read(snap.unwrap().join("model.safetensors")).unwrap(),
        std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap()
    );
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /cdn/") && r.contains("[bytes=")));
}

/// Issue 20: a listing whose names or commit would climb out of the cache is refused before a
/// byte is written.
#[test]
fn hostile_listings_cannot_write_outside_the_cache() {
    let fake = FakeHub::start();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("hub");
    let hub = Hub::new(fake.options(&cache, None)).unwrap();
    for (repo, says) in [
        ("org/evil-names", "escape.safetensors"),
        ("org/evil-sha", "commit"),
    ] {
        let (snap, _) = collect(&hub, repo, &Cancel::new());
        let err = snap.unwrap_err().to_string();
        assert!(
            err.contains("refusing") && err.contains(says),
            "{repo}: {err}"
        );
    }
    let outside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "hub")
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
    assert!(!fake
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /org/evil")));
}

/// Issue 20: the token never appears in an error, an event or the CLI's output, even when the
/// server echoes it back (a token-shaped canary).
#[test]
fn the_token_never_appears_in_errors_events_or_output() {
    const CANARY: &str = "hf_canaryTOKEN0123456789abcdefXYZ";
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), Some(CANARY))).unwrap();
    let mut seen = Vec::new();
    let search = hub.search(&SearchQuery {
        text: "llama".into(),
        ..Default::default()
    });
    seen.push(format!("{search:?}"));
    let details = hub.details("org/tiny-llama", None);
    seen.push(format!("{details:?}"));
    let (snap, events) = collect(&hub, "org/tiny-llama", &Cancel::new());
    let err = snap.unwrap_err();
    assert!(matches!(err, HubError::BadToken { .. }), "{err:?}");
    seen.push(format!("{err} {err:?} {events:?}"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(["download", "org/tiny-llama"])
        .env("HF_ENDPOINT", &fake.url)
        .env("HF_HOME", cache.path())
        .env("HF_TOKEN", CANARY)
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    seen.push(String::from_utf8_lossy(&out.stdout).into_owned());
    seen.push(String::from_utf8_lossy(&out.stderr).into_owned());
    let all = seen.join("\n");
    assert!(all.contains("rejected the token"), "{all}");
    assert!(!all.contains(CANARY), "the token leaked:\n{all}");
    // The server did get it (the canary was sent and echoed), so the test can fail.
    assert!(fake.requests().len() >= 3);
}

#[test]
fn cancel_keeps_the_partial_file_and_the_next_download_resumes() {
    let fake = FakeHub::start();
    fake.behaviour.lock().unwrap().slow = Some(Duration::from_millis(30));
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let cancel = Cancel::new();
    let mut events = Vec::new();
    let result = hub.download(
        "org/tiny-llama",
        None,
        &mut |e| {
            if let DownloadEvent::Progress(p) = &e {
                if p.file == "model.safetensors" && p.done_bytes > 0 {
                    cancel.cancel();
                }
            }
            events.push(e);
        },
        &cancel,
    );
    assert!(matches!(result, Err(HubError::Cancelled)), "{result:?}");
    let msg = HubError::Cancelled.to_string();
    assert!(msg.contains("resumes"), "{msg}");
    let blobs = cache.path().join("models--org--tiny-llama/blobs");
    let partial: Vec<PathBuf> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert!(cached_snapshot(cache.path(), "org/tiny-llama", None).is_none());

    fake.behaviour.lock().unwrap().slow = None;
    let (snap, events) = collect(&hub, "org/tiny-llama", &Cancel::new());
    snap.unwrap();
    let resumed = events.iter().find_map(|e| match e {
        DownloadEvent::FileStarted {
            file,
            resumed_bytes,
            ..
        } if file == "model.safetensors" => Some(*resumed_bytes),
        _ => None,
    });
    assert!(resumed.is_some_and(|b| b > 0), "{events:?}");
}

#[test]
fn gated_models_say_where_to_accept_the_license() {
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let url = format!("{}/org/gated-llama", fake.url);

    let anon = Hub::new(fake.options(cache.path(), None)).unwrap();
    let e = collect(&anon, "org/gated-llama", &Cancel::new())
        .0
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, HubError::GatedNoToken { .. }), "{text}");
    assert!(
        text.contains(&url) && text.contains("accept its license"),
        "{text}"
    );
    assert!(text.contains("token"), "{text}");

    let wrong = Hub::new(fake.options(cache.path(), Some("hf_wrong"))).unwrap();
    let e = collect(&wrong, "org/gated-llama", &Cancel::new())
        .0
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, HubError::GatedNoAccess { .. }), "{text}");
    assert!(text.contains(&url) && !text.contains("hf_wrong"), "{text}");

    let good = Hub::new(fake.options(cache.path(), Some(GOOD_TOKEN))).unwrap();
    let snap = collect(&good, "org/gated-llama", &Cancel::new()).0.unwrap();
    assert!(snap.join("model.safetensors").is_file());
    assert!(!format!("{good:?}").contains(GOOD_TOKEN));
}

#[test]
fn missing_repos_and_shard_selection() {
    let fake = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(fake.options(cache.path(), None)).unwrap();
    let e = collect(&hub, "org/missing", &Cancel::new()).0.unwrap_err();
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e}");
    assert!(e.to_string().contains("org/missing"));

    let (snap, _) = collect(&hub, "org/tiny-llama-sharded", &Cancel::new());
    let snap = snap.unwrap();
    assert!(snap.join("model-00010-of-00010.safetensors").is_file());
    assert!(!snap.join("model-extra.safetensors").exists());
    finetune::model::Model::load(&snap, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
}

#[test]
fn unreachable_hub_is_a_network_error_and_the_cache_still_works() {
    let cache = tempfile::tempdir().unwrap();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hub = Hub::new(HubOptions {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        cache_dir: Some(cache.path().to_path_buf()),
        token: None,
    })
    .unwrap();
    let e = hub.search(&SearchQuery::default()).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, HubError::Network { .. }), "{text}");
    assert!(text.contains("offline"), "{text}");
    assert!(cached_models(cache.path()).is_empty());
    let e = hub
        .download("org/tiny-llama", None, &mut |_| {}, &Cancel::new())
        .unwrap_err();
    assert!(matches!(e, HubError::Network { .. }), "{e}");

    // Once a model is in the cache, a download offline hands back the cached snapshot.
    let fake = FakeHub::start();
    let online = Hub::new(fake.options(cache.path(), None)).unwrap();
    let snap = online
        .download("org/tiny-llama", None, &mut |_| {}, &Cancel::new())
        .unwrap();
    let mut events = Vec::new();
    let offline = hub
        .download(
            "org/tiny-llama",
            None,
            &mut |e| events.push(e),
            &Cancel::new(),
        )
        .unwrap();
    assert_eq!(offline, snap);
    assert_eq!(events.len(), 1);
    assert_eq!(cached_models(cache.path()).len(), 1);
}

/// The only test that touches process-wide variables; every other test passes its endpoint and
/// cache explicitly, so running in parallel with them is safe.
#[test]
fn hf_endpoint_and_hf_home_point_the_app_at_the_fake_hub() {
    let fake = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &fake.url);
    std::env::set_var("HF_HOME", home.path());
    std::env::remove_var("HF_HUB_CACHE");
    let hub = Hub::from_env(None).unwrap();
    std::env::remove_var("HF_ENDPOINT");
    std::env::remove_var("HF_HOME");
    assert_eq!(hub.endpoint(), fake.url);
    assert_eq!(hub.cache_dir(), home.path().join("hub"));
    let rows = hub
        .search(&SearchQuery {
            text: "gpt2".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 1);
    let snap = hub
        .download("other/tiny-gpt2", None, &mut |_| {}, &Cancel::new())
        .unwrap();
    assert!(snap.starts_with(home.path().join("hub/models--other--tiny-gpt2")));
}
