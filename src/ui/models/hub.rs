//! The Hub side of the Models step: search, results, details, download with progress and cancel.

use super::*;

#[derive(Default)]
pub(super) struct HubPanel {
    pub(super) setup: HubSetup,
    pub(super) worker: Option<HubWorker>,
    /// Why there is no worker or client.
    pub(super) worker_problem: Option<Problem>,
    pub(super) endpoint: Option<String>,
    /// Where the token in use came from (never the token).
    pub(super) token_source: Option<TokenSource>,
    /// Read from the keychain at start, until the app takes it into the settings.
    pub(super) keychain_token: Option<HfToken>,
    /// What became of the last token change, or why the keychain could not be read.
    pub(super) token_note: Option<Result<String, String>>,
    /// The last token change was a removal.
    pub(super) saving_empty: bool,
    /// Open the token section on the next frame (after a gated or token error).
    pub(super) open_token: bool,
    pub(super) text: String,
    pub(super) author: String,
    pub(super) sort: SearchSort,
    pub(super) supported_only: bool,
    /// The last search sent; answers to other ones are stale.
    pub(super) last_query: Option<SearchQuery>,
    pub(super) searching: bool,
    /// The search whose answer `rows` (or `search_problem`) holds.
    pub(super) searched: Option<SearchQuery>,
    pub(super) rows: Vec<SearchRow>,
    pub(super) search_problem: Option<Problem>,
    pub(super) selected: Option<String>,
    /// Details by repo, asked for or prefetched.
    pub(super) details: HashMap<String, Result<ModelDetails, Problem>>,
    /// Repos whose details were asked for and have not arrived.
    pub(super) asked: HashSet<String>,
    pub(super) download: Option<Download>,
    /// How the last download ended: its snapshot or what went wrong.
    pub(super) outcome: Option<(String, Result<PathBuf, Problem>)>,
}

/// A download in progress.
pub(super) struct Download {
    pub(super) repo: String,
    pub(super) cancel: Cancel,
    pub(super) cancelling: bool,
    pub(super) files_total: usize,
    pub(super) files_done: usize,
    pub(super) total_bytes: u64,
    pub(super) progress: Option<DownloadProgress>,
    /// The file being fetched.
    pub(super) file: Option<String>,
    /// A dropped connection being retried.
    pub(super) retry: Option<String>,
}

impl Download {
    pub(super) fn new(repo: String, cancel: Cancel, total_bytes: u64) -> Self {
        Self {
            repo,
            cancel,
            cancelling: false,
            files_total: 0,
            files_done: 0,
            total_bytes,
            progress: None,
            file: None,
            retry: None,
        }
    }

    pub(super) fn apply(&mut self, event: DownloadEvent) {
        match event {
            DownloadEvent::Planned {
                files, total_bytes, ..
            } => {
                self.files_total = files.len();
                self.total_bytes = total_bytes;
            }
            DownloadEvent::FileStarted { file, .. } => {
                self.file = Some(file);
                self.retry = None;
            }
            DownloadEvent::Progress(p) => {
                self.total_bytes = p.total_bytes;
                self.file = Some(p.file.clone());
                self.progress = Some(p);
            }
            DownloadEvent::Retrying {
                file,
                attempt,
                reason,
            } => {
                self.retry = Some(format!(
                    "The connection dropped while fetching {file} ({reason}); retry {attempt}, resuming where it stopped."
                ));
            }
            DownloadEvent::FileDone { .. } => self.files_done += 1,
            DownloadEvent::Done { .. } => {}
        }
    }

    /// "1.2 MB of 4.0 MB · 850 KB/s · 0:03 left".
    pub(super) fn progress_text(&self) -> String {
        let done = self.progress.as_ref().map_or(0, |p| p.done_bytes);
        let mut text = format!(
            "{} of {}",
            format_bytes(done),
            format_bytes(self.total_bytes)
        );
        match &self.progress {
            Some(p) if p.bytes_per_sec > 0.0 => {
                text += &format!(" · {}/s", format_bytes(p.bytes_per_sec as u64));
                if let Some(eta) = p.eta_secs {
                    text += &format!(" · {} left", format_duration(eta));
                }
            }
            _ => text += " · measuring the rate…",
        }
        text
    }
}

impl HubPanel {
    pub(super) fn send(&mut self, command: HubCommand) -> Result<(), String> {
        match &self.worker {
            Some(w) => w.send(command),
            None => Err(self.worker_problem.as_ref().map_or_else(
                || "the Hub worker is not running; restart FineTune".to_owned(),
                |p| p.text.clone(),
            )),
        }
    }

    pub(super) fn worker_stopped(&mut self) {
        self.worker = None;
        self.searching = false;
        self.asked.clear();
        self.download = None;
        self.worker_problem = Some(Problem {
            text: "the Hub worker stopped unexpectedly; restart FineTune to search and download \
                   (downloaded models still work)"
                .into(),
            kind: ProblemKind::Other,
        });
    }

    pub(super) fn search(&mut self) {
        let author = self.author.trim();
        let query = SearchQuery {
            text: self.text.trim().to_owned(),
            sort: self.sort,
            author: (!author.is_empty()).then(|| author.to_owned()),
            supported_only: self.supported_only,
            limit: SEARCH_LIMIT,
        };
        match self.send(HubCommand::Search(query.clone())) {
            Ok(()) => {
                self.last_query = Some(query);
                self.searching = true;
            }
            Err(e) => self.search_problem = Some(Problem::other(e)),
        }
    }

    pub(super) fn select(&mut self, repo: &str) {
        self.selected = Some(repo.to_owned());
        self.ask_details(repo);
    }

    /// Asks for `repo`'s details unless they are here or on their way.
    pub(super) fn ask_details(&mut self, repo: &str) {
        if self.details.contains_key(repo) || self.asked.contains(repo) {
            return;
        }
        match self.send(HubCommand::Details(repo.to_owned())) {
            Ok(()) => {
                self.asked.insert(repo.to_owned());
            }
            Err(e) => {
                self.details.insert(repo.to_owned(), Err(Problem::other(e)));
            }
        }
    }

    pub(super) fn start_download(&mut self, d: &ModelDetails) {
        let cancel = Cancel::new();
        let command = HubCommand::Download {
            repo: d.repo.clone(),
            cancel: cancel.clone(),
        };
        self.outcome = None;
        match self.send(command) {
            Ok(()) => {
                self.download = Some(Download::new(d.repo.clone(), cancel, d.download_bytes));
            }
            Err(e) => self.outcome = Some((d.repo.clone(), Err(Problem::other(e)))),
        }
    }

    pub(super) fn set_token(&mut self, token: &HfToken) {
        self.saving_empty = token.is_empty();
        if let Err(e) = self.send(HubCommand::SetToken(token.clone())) {
            self.token_note = Some(Err(e));
        }
    }
}

impl ModelsPanel {
    /// Hub search: the query row, the results table beside the selected row's details, and the
    /// token section.
    pub(super) fn hub_ui(&mut self, ui: &mut Ui, token: &mut HfToken) -> Option<ModelAction> {
        let mut action = None;
        ui.strong("Search the Hugging Face Hub");
        if let Some(p) = &self.hub.worker_problem {
            problem_ui(ui, p);
        }
        self.search_bar_ui(ui);
        if let Some(p) = &self.hub.search_problem {
            problem_ui(ui, p);
        }
        if let Some(q) = &self.hub.searched {
            if self.hub.rows.is_empty() && self.hub.search_problem.is_none() {
                ui.weak(format!(
                    "No text-generation models match \"{}\"{}. Try a shorter name{}.",
                    q.text,
                    q.author
                        .as_ref()
                        .map(|a| format!(" by {a}"))
                        .unwrap_or_default(),
                    if q.supported_only {
                        " or turn off \"Supported only\""
                    } else {
                        ""
                    }
                ));
            }
        }
        if !self.hub.rows.is_empty() {
            ui.add_space(4.0);
            let total = ui.available_width();
            if total >= 820.0 {
                let details_w = (total * 0.36).clamp(300.0, 440.0);
                ui.horizontal_top(|ui| {
                    ui.vertical(|ui| {
                        ui.set_width(total - details_w - 24.0);
                        self.results_ui(ui);
                    });
                    ui.add_space(12.0);
                    ui.vertical(|ui| {
                        ui.set_width(details_w);
                        action = self.details_ui(ui);
                    });
                });
            } else {
                self.results_ui(ui);
                ui.add_space(6.0);
                action = self.details_ui(ui);
            }
        }
        ui.add_space(8.0);
        let open = std::mem::take(&mut self.hub.open_token).then_some(true);
        egui::CollapsingHeader::new("Hugging Face token")
            .id_salt("hub-token-section")
            .open(open)
            .show(ui, |ui| self.hub_token_ui(ui, token));
        action
    }

    /// Query text (Enter searches), sort, author, "Supported only".
    pub(super) fn search_bar_ui(&mut self, ui: &mut Ui) {
        let hub = &mut self.hub;
        let mut go = false;
        ui.horizontal(|ui| {
            let l = ui.label("Search:");
            let edit = ui
                .add(
                    egui::TextEdit::singleline(&mut hub.text)
                        .id_salt("hub-search")
                        .hint_text("e.g. SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B")
                        .desired_width(280.0),
                )
                .labelled_by(l.id);
            go |= edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            go |= ui
                .add_enabled(hub.worker.is_some(), egui::Button::new("Search"))
                .clicked();
            if hub.searching {
                ui.spinner();
                ui.weak("Searching…");
            }
        });
        let searched = hub.searched.is_some();
        ui.horizontal(|ui| {
            let l = ui.label("Sort by:");
            let before = hub.sort;
            egui::ComboBox::from_id_salt("hub-sort")
                .selected_text(sort_label(hub.sort))
                .show_ui(ui, |ui| {
                    for s in [
                        SearchSort::Downloads,
                        SearchSort::Trending,
                        SearchSort::Likes,
                    ] {
                        ui.selectable_value(&mut hub.sort, s, sort_label(s));
                    }
                })
                .response
                .labelled_by(l.id);
            ui.add_space(8.0);
            let l = ui.label("Author:");
            let author = ui
                .add(
                    egui::TextEdit::singleline(&mut hub.author)
                        .id_salt("hub-author")
                        .hint_text("any")
                        .desired_width(140.0),
                )
                .labelled_by(l.id);
            go |= author.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            ui.add_space(8.0);
            let toggled = ui
                .checkbox(&mut hub.supported_only, "Supported only")
                .on_hover_text(format!(
                    "Only architectures FineTune trains: {}",
                    crate::model::SUPPORTED_ARCHITECTURES.join(", ")
                ))
                .changed();
            // Re-sorting or filtering redoes the search shown.
            go |= searched && (toggled || hub.sort != before);
        });
        if let Some(e) = &hub.endpoint {
            ui.weak(format!(
                "Hub: {e} · {}",
                match &hub.token_source {
                    Some(s) => format!("token from {s}"),
                    None => "no token (public models only)".into(),
                }
            ));
        }
        if go {
            hub.search();
        }
    }

    /// The results: name, architecture, parameters, size, downloads, trainable.
    pub(super) fn results_ui(&mut self, ui: &mut Ui) {
        let mut clicked = None;
        let hub = &self.hub;
        egui::ScrollArea::both()
            .id_salt("hub-results")
            .max_height(340.0)
            .auto_shrink([false, true])
            .show(ui, |ui| {
                egui::Grid::new("hub-results-grid")
                    .num_columns(6)
                    .striped(true)
                    .spacing([14.0, 4.0])
                    .show(ui, |ui| {
                        for h in [
                            "Model",
                            "Architecture",
                            "Parameters",
                            "Size",
                            "Downloads",
                            "Trainable",
                        ] {
                            ui.strong(h);
                        }
                        ui.end_row();
                        for r in &hub.rows {
                            let details = match hub.details.get(&r.repo) {
                                Some(Ok(d)) => Some(d),
                                _ => None,
                            };
                            ui.horizontal(|ui| {
                                let selected = hub.selected.as_ref() == Some(&r.repo);
                                if ui
                                    .selectable_label(selected, &r.repo)
                                    .on_hover_text("Show its details")
                                    .clicked()
                                {
                                    clicked = Some(r.repo.clone());
                                }
                                if r.gated.is_some() {
                                    ui.weak("gated")
                                        .on_hover_text("Accept its license on the Hub first");
                                }
                            });
                            ui.label(r.architecture.as_deref().unwrap_or("?"));
                            let params = r.parameters.or(details.and_then(|d| d.parameters));
                            match params {
                                Some(p) => ui.label(format_count(p as usize)),
                                None => ui.weak("…"),
                            };
                            match details {
                                Some(d) => ui.label(format_bytes(d.download_bytes)),
                                None => ui.weak("…").on_hover_text("Reading the file list…"),
                            };
                            ui.label(format_count(r.downloads as usize));
                            supported_ui(ui, &r.supported);
                            ui.end_row();
                        }
                    });
            });
        if let Some(repo) = clicked {
            self.hub.select(&repo);
        }
    }

    /// The selected row's details and its download.
    pub(super) fn details_ui(&mut self, ui: &mut Ui) -> Option<ModelAction> {
        let mut action = None;
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_width(ui.available_width());
            let Some(repo) = self.hub.selected.clone() else {
                ui.weak("Select a model in the table to see its details and download it.");
                return;
            };
            ui.strong(RichText::new(&repo).size(16.0));
            match self.hub.details.get(&repo).cloned() {
                None => {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label("Reading the model's details…");
                    });
                }
                Some(Err(p)) => {
                    problem_ui(ui, &p);
                    if ui.button("Try again").clicked() {
                        self.hub.details.remove(&repo);
                        self.hub.ask_details(&repo);
                    }
                }
                Some(Ok(d)) => {
                    facts_ui(ui, &d);
                    ui.add_space(6.0);
                    action = self.download_ui(ui, &d);
                }
            }
        });
        action
    }

    /// Download button, or the running download's progress and Cancel, and how the last one
    /// ended.
    pub(super) fn download_ui(&mut self, ui: &mut Ui, d: &ModelDetails) -> Option<ModelAction> {
        let mut action = None;
        let cached = self.cached(&d.repo).map(Path::to_path_buf);
        let hub = &mut self.hub;
        match &mut hub.download {
            Some(dl) if dl.repo == d.repo => {
                let frac = match (&dl.progress, dl.total_bytes) {
                    (Some(p), t) if t > 0 => (p.done_bytes as f64 / t as f64) as f32,
                    _ => 0.0,
                };
                ui.add(
                    egui::ProgressBar::new(frac.clamp(0.0, 1.0))
                        .text(dl.progress_text())
                        .animate(!dl.cancelling),
                );
                if let Some(f) = &dl.file {
                    ui.weak(format!(
                        "File {} of {}: {f}",
                        (dl.files_done + 1).min(dl.files_total.max(1)),
                        dl.files_total
                    ));
                }
                if let Some(r) = &dl.retry {
                    ui.weak(r);
                }
                ui.horizontal(|ui| {
                    if dl.cancelling {
                        ui.spinner();
                        ui.label("Cancelling…");
                    } else if ui
                        .button("Cancel")
                        .on_hover_text("Stop; what arrived is kept and the next download resumes")
                        .clicked()
                    {
                        dl.cancel.cancel();
                        dl.cancelling = true;
                    }
                });
            }
            Some(other) => {
                ui.weak(format!(
                    "Downloading {}; one download at a time.",
                    other.repo
                ));
            }
            None => {
                ui.horizontal(|ui| {
                    let why_not = match (&d.weights, &d.supported) {
                        (Err(e), _) | (_, Err(e)) => Some(e.clone()),
                        _ => None,
                    };
                    let label = format!("Download ({})", format_bytes(d.download_bytes));
                    let r = ui
                        .add_enabled(why_not.is_none(), egui::Button::new(label))
                        .on_hover_text(format!(
                            "Fetches config, tokenizer and weights ({} files) into the shared Hugging Face cache, then chooses the model",
                            d.files.len()
                        ));
                    let r = match &why_not {
                        Some(w) => r.on_disabled_hover_text(format!("FineTune cannot train it: {w}")),
                        None => r,
                    };
                    if r.clicked() {
                        hub.start_download(d);
                    }
                    if let Some(path) = &cached {
                        if ui
                            .button("Use the downloaded copy")
                            .on_hover_text(path.display().to_string())
                            .clicked()
                        {
                            action = Some(ModelAction::Choose(path.clone()));
                        }
                    }
                });
            }
        }
        if let Some((repo, outcome)) = &self.hub.outcome {
            if *repo == d.repo {
                match outcome {
                    Ok(path) => {
                        ui.label(
                            RichText::new(format!(
                                "Downloaded; it is now the chosen model: {}",
                                path.display()
                            ))
                            .color(ok_color()),
                        );
                    }
                    Err(p) => problem_ui(ui, p),
                }
            }
        }
        action
    }

    /// The Hugging Face token field (shown in the Models panel and the Settings step).
    pub fn hub_token_ui(&mut self, ui: &mut Ui, token: &mut HfToken) {
        let hub = &mut self.hub;
        let tokens_page = format!(
            "{}/settings/tokens",
            hub.endpoint
                .as_deref()
                .unwrap_or(crate::hub::DEFAULT_ENDPOINT)
        );
        ui.weak("Needed for gated and private models: accept the model's license on its Hub page, then paste a read token. It is kept in the OS keychain, never in the settings file.");
        ui.horizontal(|ui| {
            let l = ui.label("Hugging Face token:");
            let edit = ui
                .add(
                    egui::TextEdit::singleline(&mut token.0)
                        .id_salt("hf-token")
                        .password(true)
                        .hint_text("hf_…")
                        .desired_width(300.0),
                )
                .labelled_by(l.id);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Save token").clicked() || enter {
                hub.set_token(token);
            }
            if ui
                .add_enabled(!token.is_empty(), egui::Button::new("Forget"))
                .on_hover_text("Remove the token from the keychain")
                .clicked()
            {
                token.0.clear();
                hub.set_token(token);
            }
        });
        ui.horizontal_wrapped(|ui| {
            ui.weak("Create one at");
            ui.hyperlink(&tokens_page);
        });
        match &hub.token_note {
            Some(Ok(t)) => {
                ui.label(RichText::new(t).color(ok_color()));
            }
            Some(Err(e)) => {
                ui.label(RichText::new(e).color(error_color(ui)));
            }
            None => {}
        }
        ui.weak(match &hub.token_source {
            Some(TokenSource::Settings) => "In use: the token above.".to_owned(),
            Some(s) => format!("In use: the token from {s}."),
            None => "No token in use: public models only.".to_owned(),
        });
    }

    /// `repo`'s main snapshot in the local cache, if it is there.
    pub(super) fn cached(&self, repo: &str) -> Option<&Path> {
        self.cache
            .iter()
            .find(|m| m.repo_id == repo && m.is_main)
            .map(|m| m.path.as_path())
    }
}

pub(super) fn sort_label(s: SearchSort) -> &'static str {
    match s {
        SearchSort::Downloads => "Downloads",
        SearchSort::Trending => "Trending",
        SearchSort::Likes => "Likes",
        SearchSort::Updated => "Recently updated",
    }
}

pub(super) fn ok_color() -> Color32 {
    Color32::from_rgb(40, 150, 70)
}

/// A check mark or a cross, drawn (the bundled fonts have neither glyph).
pub(super) fn mark_ui(ui: &mut Ui, ok: bool) {
    let size = ui.text_style_height(&egui::TextStyle::Body);
    let (rect, _) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
    let r = rect.shrink(size * 0.2);
    let (color, points): (Color32, &[[egui::Pos2; 2]]) = if ok {
        let mid = egui::pos2(r.left() + r.width() * 0.38, r.bottom());
        (
            ok_color(),
            &[
                [egui::pos2(r.left(), r.center().y), mid],
                [mid, r.right_top()],
            ],
        )
    } else {
        (
            error_color(ui),
            &[
                [r.left_top(), r.right_bottom()],
                [r.right_top(), r.left_bottom()],
            ],
        )
    };
    for p in points {
        ui.painter()
            .line_segment(*p, egui::Stroke::new(size * 0.13, color));
    }
}

/// A check mark and "yes", or a cross with a short reason (the whole reason on hover).
pub(super) fn supported_ui(ui: &mut Ui, supported: &Result<(), String>) {
    ui.horizontal(|ui| match supported {
        Ok(()) => {
            mark_ui(ui, true);
            ui.label(RichText::new("yes").color(ok_color()));
        }
        Err(why) => {
            // The architecture column already names it; the hover has the whole reason.
            let short = if why.contains("is not supported") {
                "unsupported"
            } else if why.contains("no transformers config.json") {
                "no config"
            } else {
                why.as_str()
            };
            mark_ui(ui, false);
            ui.label(RichText::new(format!("no: {short}")).color(error_color(ui)))
                .on_hover_text(why);
        }
    });
}

/// Architecture, parameters, size, gated/license, downloads, likes, whether it trains.
pub(super) fn facts_ui(ui: &mut Ui, d: &ModelDetails) {
    ui.horizontal_wrapped(|ui| {
        ui.hyperlink_to("Open on the Hub", &d.url);
        if let Some(c) = &d.commit {
            ui.weak(format!("commit {}", &c[..c.len().min(10)]));
        }
    });
    egui::Grid::new("hub-details-grid")
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            let arch = match (&d.architecture, &d.model_type) {
                (Some(a), Some(t)) => format!("{a} ({t})"),
                (Some(a), None) => a.clone(),
                (None, _) => "unknown".into(),
            };
            fact(ui, "Architecture", &arch);
            ui.end_row();
            let params = match d.parameters {
                Some(p) => {
                    let dtypes: Vec<&str> = d
                        .parameters_by_dtype
                        .iter()
                        .map(|(t, _)| t.as_str())
                        .collect();
                    if dtypes.is_empty() {
                        format_count(p as usize)
                    } else {
                        format!("{} ({})", format_count(p as usize), dtypes.join(", "))
                    }
                }
                None => "unknown".into(),
            };
            fact(ui, "Parameters", &params);
            ui.end_row();
            fact(
                ui,
                "Download",
                &format!(
                    "{} in {} file{}",
                    format_bytes(d.download_bytes),
                    d.files.len(),
                    if d.files.len() == 1 { "" } else { "s" }
                ),
            );
            ui.end_row();
            fact(
                ui,
                "Gated",
                &match &d.gated {
                    Some(mode) => format!("yes ({mode}): accept the license first"),
                    None => "no".into(),
                },
            );
            ui.end_row();
            fact(ui, "License", d.license.as_deref().unwrap_or("unknown"));
            ui.end_row();
            fact(
                ui,
                "Popularity",
                &format!(
                    "{} downloads, {} likes",
                    format_count(d.downloads as usize),
                    d.likes
                ),
            );
            ui.end_row();
            ui.weak("Trainable");
            ui.horizontal_wrapped(|ui| match (&d.supported, &d.weights) {
                (Ok(()), Ok(kind)) => {
                    mark_ui(ui, true);
                    ui.label(RichText::new(format!("yes ({kind} weights)")).color(ok_color()));
                }
                (Err(why), _) | (_, Err(why)) => {
                    mark_ui(ui, false);
                    ui.label(RichText::new(format!("no: {why}")).color(error_color(ui)));
                }
            });
            ui.end_row();
        });
    if d.gated.is_some() {
        ui.horizontal_wrapped(|ui| {
            ui.hyperlink_to("Accept the license", &d.url);
            ui.weak("then set your token under \"Hugging Face token\" below.");
        });
    }
    egui::CollapsingHeader::new(format!("Files to download ({})", d.files.len()))
        .id_salt(("hub-files", &d.repo))
        .show(ui, |ui| {
            for f in &d.files {
                ui.horizontal(|ui| {
                    ui.label(&f.path);
                    ui.weak(format_bytes(f.bytes));
                });
            }
            if ui.small_button("Copy summary").clicked() {
                ui.ctx().copy_text(d.summary());
            }
        });
}

/// A Hub problem: its message (which says what to do next) and, for a gated model, the link to
/// its license.
pub(super) fn problem_ui(ui: &mut Ui, p: &Problem) {
    let color = match p.kind {
        ProblemKind::Cancelled => ui.visuals().text_color(),
        _ => error_color(ui),
    };
    ui.label(RichText::new(&p.text).color(color));
    match &p.kind {
        ProblemKind::Gated { url } => {
            ui.horizontal_wrapped(|ui| {
                ui.hyperlink_to("Open the license page", url);
                ui.weak("then set your token under \"Hugging Face token\" below (or in step 3, Settings).");
            });
        }
        ProblemKind::Offline => {
            ui.weak("Offline: the downloaded models listed above still work; choose one there.");
        }
        ProblemKind::BadToken => {
            ui.weak("Fix the token under \"Hugging Face token\" below.");
        }
        ProblemKind::Cancelled | ProblemKind::Other => {}
    }
}
