//! A fake Hugging Face Hub on 127.0.0.1 for tests/hub.rs: a tiny HTTP/1.1 server (one thread per
//! connection, `Connection: close`) answering `/api/models` search, model info (with
//! `/revision/{rev}`), the file tree, `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with ETag /
//! X-Repo-Commit / Content-Length / Range, an absolute redirect to `/cdn/{etag}` for weights (as
//! the real Hub redirects LFS files, with X-Linked-Etag / X-Linked-Size), 401/403 with
//! `X-Error-Code: GatedRepo` for a gated repo, 404s, and, on request, a connection dropped
//! mid-file, a slow body, mirror mode (LFS bytes served at the resolve URL with the X-Linked
//! headers on 200 and 206 answers) or a server that ignores Range. Repos are built from the tiny
//! fixtures.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use finetune::hub::HubOptions;

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const GOOD_TOKEN: &str = "hf_good_token";

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct FakeFile {
    bytes: Vec<u8>,
    etag: String,
    /// Served through a redirect to `/cdn/{etag}` like an LFS/xet file on the Hub.
    lfs: bool,
}

struct FakeRepo {
    files: Vec<(String, FakeFile)>,
    gated: bool,
    architecture: &'static str,
    /// The commit the model info names (default [`COMMIT`]).
    sha: Option<&'static str>,
}

#[derive(Default)]
pub struct Behaviour {
    /// Files whose GETs from offset 0 send only half the body, then close the socket.
    pub drop_first: Vec<String>,
    /// Pause between 16 KiB body chunks (to cancel mid-file).
    pub slow: Option<Duration>,
    /// Serve LFS files at the resolve URL itself, as a mirror that proxies the CDN does (e.g.
    /// hf-mirror.com): no redirect, and `X-Linked-Etag` / `X-Linked-Size` (the whole file) on
    /// every answer, 206 included.
    pub mirror: bool,
    /// Files whose ranged GETs are answered 200 with the whole file (a server ignoring Range).
    pub ignore_range: Vec<String>,
}

pub struct FakeHub {
    pub url: String,
    /// `METHOD path [range]` of every request, in order.
    log: Arc<Mutex<Vec<String>>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
}

fn repo_from_dir(dir: &Path, skip: &[&str], extra: &[(&str, &[u8])], gated: bool) -> FakeRepo {
    let mut files = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    for p in names {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if skip.iter().any(|s| name.starts_with(s)) {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        files.push((name.clone(), make_file(&name, bytes)));
    }
    for (name, bytes) in extra {
        files.push((name.to_string(), make_file(name, bytes.to_vec())));
    }
    FakeRepo {
        files,
        gated,
        architecture: "LlamaForCausalLM",
        sha: None,
    }
}

fn make_file(name: &str, bytes: Vec<u8>) -> FakeFile {
    let lfs = name.ends_with(".safetensors");
    let h = format!("{:016x}", fnv(&bytes));
    let etag = if lfs {
        h.repeat(4)
    } else {
        format!("{h}{h}{}", &h[..8])
    };
    FakeFile { bytes, etag, lfs }
}

fn repos() -> HashMap<String, FakeRepo> {
    let mut m = HashMap::new();
    let skip = ["reference", "peft-adapter"];
    m.insert(
        "org/tiny-llama".into(),
        repo_from_dir(
            &fixture("tiny-llama"),
            &skip,
            &[("README.md", b"# tiny"), ("onnx/model.onnx", b"onnx")],
            false,
        ),
    );
    m.insert(
        "org/gated-llama".into(),
        repo_from_dir(&fixture("tiny-llama"), &skip, &[], true),
    );
    m.insert(
        "org/tiny-llama-sharded".into(),
        repo_from_dir(
            &fixture("tiny-llama-sharded"),
            &[],
            &[("model-extra.safetensors", b"not named by the index")],
            false,
        ),
    );
    // Hostile listings (issue 20): a weight whose name climbs out with backslashes, and a
    // "commit" that is a path.
    m.insert(
        "org/evil-names".into(),
        repo_from_dir(
            &fixture("tiny-llama"),
            &["reference", "peft-adapter", "model.safetensors"],
            &[("..\\..\\escape.safetensors", b"x")],
            false,
        ),
    );
    let mut evil_sha = repo_from_dir(&fixture("tiny-llama"), &skip, &[], false);
    evil_sha.sha = Some("../../../../escape");
    m.insert("org/evil-sha".into(), evil_sha);
    let mut gpt = repo_from_dir(&fixture("tiny-gpt2"), &skip, &[], false);
    gpt.architecture = "GPT2LMHeadModel";
    m.insert("other/tiny-gpt2".into(), gpt);
    let mut bert = repo_from_dir(&fixture("tiny-gpt2"), &skip, &[], false);
    bert.architecture = "BertForMaskedLM";
    m.insert("other/tiny-bert".into(), bert);
    m
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn json_response(stream: &mut TcpStream, status: &str, value: &serde_json::Value) {
    let body = value.to_string().into_bytes();
    let h = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    respond(stream, status, &h, &body);
}

fn error(stream: &mut TcpStream, status: &str, code: &str, message: &str) {
    let h = vec![
        ("X-Error-Code".to_owned(), code.to_owned()),
        ("X-Error-Message".to_owned(), message.to_owned()),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    let body = serde_json::json!({ "error": message }).to_string();
    respond(stream, status, &h, body.as_bytes());
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn info_json(id: &str, repo: &FakeRepo, full: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "_id": format!("id-{id}"),
        "id": id,
        "modelId": id,
        "author": id.split('/').next(),
        "downloads": if id.contains("gpt2") { 50 } else { 1234 },
        "likes": 7,
        "private": false,
        "gated": if repo.gated { serde_json::json!("manual") } else { serde_json::json!(false) },
        "pipeline_tag": "text-generation",
        "library_name": "transformers",
        "tags": ["transformers", "safetensors", "text-generation", "license:apache-2.0"],
        "createdAt": "2025-01-01T00:00:00.000Z",
        "config": {"architectures": [repo.architecture], "model_type": "llama"},
    });
    if full {
        let obj = v.as_object_mut().unwrap();
        obj.insert("sha".into(), repo.sha.unwrap_or(COMMIT).into());
        obj.insert(
            "cardData".into(),
            serde_json::json!({"license": "apache-2.0"}),
        );
        obj.insert(
            "safetensors".into(),
            serde_json::json!({"parameters": {"F32": 146_240}, "total": 146_240}),
        );
        obj.insert(
            "siblings".into(),
            repo.files
                .iter()
                .map(|(n, _)| serde_json::json!({ "rfilename": n }))
                .collect(),
        );
    }
    v
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let repos = Arc::new(repos());
        let log = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let (l, b, base) = (log.clone(), behaviour.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (repos, l, b, base) = (repos.clone(), l.clone(), b.clone(), base.clone());
                std::thread::spawn(move || serve(stream, &repos, &l, &b, &base));
            }
        });
        Self {
            url,
            log,
            behaviour,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn options(&self, cache: &Path, token: Option<&str>) -> HubOptions {
        HubOptions {
            endpoint: Some(self.url.clone()),
            cache_dir: Some(cache.to_path_buf()),
            token: token.map(str::to_owned),
        }
    }
}

fn serve(
    mut stream: TcpStream,
    repos: &HashMap<String, FakeRepo>,
    log: &Mutex<Vec<String>>,
    behaviour: &Mutex<Behaviour>,
    base: &str,
) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut headers: HashMap<String, String> = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let range = headers.get("range").cloned();
    log.lock().unwrap().push(format!(
        "{method} {target}{}",
        range
            .as_deref()
            .map(|r| format!(" [{r}]"))
            .unwrap_or_default()
    ));
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query: HashMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let auth_ok =
        headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {GOOD_TOKEN}"));
    let has_auth = headers.contains_key("authorization");
    // A careless server (or proxy) that echoes a rejected token in its error message: FineTune
    // must not pass it on (issue 20).
    if let Some(echo) = headers
        .get("authorization")
        .filter(|a| a.starts_with("Bearer hf_canary"))
    {
        let msg = format!("Invalid credentials in Authorization header: {echo}");
        return error(&mut stream, "401 Unauthorized", "", &msg);
    }

    if path == "/api/models" {
        let search = query.get("search").cloned().unwrap_or_default();
        let mut ids: Vec<&String> = repos
            .keys()
            .filter(|id| id.contains(&search))
            .filter(|id| {
                query
                    .get("author")
                    .is_none_or(|a| id.starts_with(&format!("{a}/")))
            })
            .collect();
        ids.sort_by_key(|id| {
            let r = &repos[*id];
            (
                std::cmp::Reverse(info_json(id, r, false)["downloads"].as_u64()),
                id.to_string(),
            )
        });
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(1000);
        let list: Vec<serde_json::Value> = ids
            .iter()
            .take(limit)
            .map(|id| info_json(id, &repos[*id], false))
            .collect();
        return json_response(&mut stream, "200 OK", &serde_json::Value::Array(list));
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let segs: Vec<&str> = rest.split('/').collect();
        if segs.len() < 2 {
            return error(&mut stream, "404 Not Found", "RepoNotFound", "no such repo");
        }
        let id = format!("{}/{}", segs[0], segs[1]);
        let Some(repo) = repos.get(&id) else {
            return error(
                &mut stream,
                "404 Not Found",
                "RepoNotFound",
                "Repository not found",
            );
        };
        let rev_ok = |rev: &str| rev == "main" || rev == COMMIT;
        match segs.get(2).copied() {
            None => return json_response(&mut stream, "200 OK", &info_json(&id, repo, true)),
            Some("revision") => {
                let rev = decode(segs.get(3).copied().unwrap_or(""));
                if !rev_ok(&rev) {
                    return error(
                        &mut stream,
                        "404 Not Found",
                        "RevisionNotFound",
                        "Invalid rev id",
                    );
                }
                return json_response(&mut stream, "200 OK", &info_json(&id, repo, true));
            }
            Some("tree") => {
                let mut entries = Vec::new();
                let mut dirs = Vec::new();
                for (name, f) in &repo.files {
                    if let Some((dir, _)) = name.split_once('/') {
                        if !dirs.contains(&dir) {
                            dirs.push(dir);
                            entries.push(
                                serde_json::json!({"type": "directory", "oid": "d0", "path": dir}),
                            );
                        }
                        continue;
                    }
                    let mut e = serde_json::json!({"type": "file", "oid": &f.etag[..40.min(f.etag.len())], "size": f.bytes.len(), "path": name});
                    if f.lfs {
                        e["lfs"] = serde_json::json!({"oid": f.etag, "size": f.bytes.len(), "pointerSize": 134});
                    }
                    entries.push(e);
                }
                return json_response(&mut stream, "200 OK", &serde_json::Value::Array(entries));
            }
            _ => return error(&mut stream, "404 Not Found", "EntryNotFound", "unknown api"),
        }
    }
    // /cdn/{etag}: the "CDN" that weights redirect to (no Hub headers, honours Range).
    let (file, id) = if let Some(etag) = path.strip_prefix("/cdn/") {
        let found = repos
            .iter()
            .flat_map(|(id, r)| r.files.iter().map(move |(n, f)| (id, n, f)))
            .find(|(_, _, f)| f.etag == etag);
        match found {
            Some((id, n, f)) => ((n.clone(), f), id.clone()),
            None => return respond(&mut stream, "404 Not Found", &[], b""),
        }
    } else {
        let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if segs.len() < 5 || segs[2] != "resolve" {
            return respond(&mut stream, "404 Not Found", &[], b"");
        }
        let id = format!("{}/{}", segs[0], segs[1]);
        let Some(repo) = repos.get(&id) else {
            return error(
                &mut stream,
                "401 Unauthorized",
                "RepoNotFound",
                "Repository not found",
            );
        };
        if repo.gated && !auth_ok {
            let msg = format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in.");
            let status = if has_auth {
                "403 Forbidden"
            } else {
                "401 Unauthorized"
            };
            return error(&mut stream, status, "GatedRepo", &msg);
        }
        let name = decode(segs[4]);
        let Some((_, f)) = repo.files.iter().find(|(n, _)| *n == name) else {
            let h = vec![
                ("X-Error-Code".to_owned(), "EntryNotFound".to_owned()),
                ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
            ];
            return respond(&mut stream, "404 Not Found", &h, b"");
        };
        let mirror = behaviour.lock().unwrap().mirror;
        if f.lfs && !mirror {
            let h = vec![
                ("Location".to_owned(), format!("{base}/cdn/{}", f.etag)),
                ("X-Linked-Etag".to_owned(), format!("\"{}\"", f.etag)),
                ("X-Linked-Size".to_owned(), f.bytes.len().to_string()),
                ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
                ("ETag".to_owned(), "\"pointer-etag\"".to_owned()),
            ];
            return respond(&mut stream, "302 Found", &h, b"");
        }
        ((name, f), id)
    };
    let (name, f) = file;
    let _ = id;
    let (mirror, ignore_range) = {
        let b = behaviour.lock().unwrap();
        (b.mirror, b.ignore_range.contains(&name))
    };
    let range = if ignore_range { None } else { range };
    let total = f.bytes.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0)
        .min(total);
    let body = &f.bytes[start..];
    let mut h = vec![
        ("ETag".to_owned(), format!("\"{}\"", f.etag)),
        ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
        ("Accept-Ranges".to_owned(), "bytes".to_owned()),
        ("Content-Length".to_owned(), body.len().to_string()),
    ];
    if mirror && f.lfs && !path.starts_with("/cdn/") {
        h.push(("X-Linked-Etag".to_owned(), format!("\"{}\"", f.etag)));
        h.push(("X-Linked-Size".to_owned(), total.to_string()));
    }
    let status = if range.is_some() {
        h.push((
            "Content-Range".to_owned(),
            format!("bytes {start}-{}/{total}", total - 1),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    if method == "HEAD" {
        return respond(&mut stream, status, &h, b"");
    }
    let (drop_now, slow) = {
        let mut b = behaviour.lock().unwrap();
        let drop_now = start == 0 && b.drop_first.contains(&name);
        if drop_now {
            b.drop_first.retain(|d| *d != name);
        }
        (drop_now, b.slow)
    };
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in &h {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let send = if drop_now { body.len() / 2 } else { body.len() };
    for chunk in body[..send].chunks(16 * 1024) {
        if stream.write_all(chunk).is_err() {
            return;
        }
        let _ = stream.flush();
        if let Some(d) = slow {
            std::thread::sleep(d);
        }
    }
    if drop_now {
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    // Drain anything left so the client sees a clean close.
    let mut sink = [0u8; 64];
    let _ = reader.read(&mut sink);
}
