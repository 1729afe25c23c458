//! The Hub side of the Models step, drawn: the search bar, results, details, download and token
//! sections (state and worker traffic in `hub.rs`, shared widgets in `hub_widgets.rs`).

use super::*;

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
            Some(dl) if dl.repo == d.repo => download_progress_ui(ui, dl),
            Some(other) => {
                ui.weak(format!(
                    "Downloading {}; one download at a time.",
                    other.repo
                ));
            }
            None => action = download_button_ui(ui, hub, d, cached.as_deref()),
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

/// A running download: progress bar, the current file, a retry note, and Cancel.
fn download_progress_ui(ui: &mut Ui, dl: &mut Download) {
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

/// The Download button (disabled, with the reason, for a model FineTune cannot train), and "Use
/// the downloaded copy" when the cache already has it.
fn download_button_ui(
    ui: &mut Ui,
    hub: &mut HubPanel,
    d: &ModelDetails,
    cached: Option<&Path>,
) -> Option<ModelAction> {
    let mut action = None;
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
        if let Some(path) = cached {
            if ui
                .button("Use the downloaded copy")
                .on_hover_text(path.display().to_string())
                .clicked()
            {
                action = Some(ModelAction::Choose(path.to_path_buf()));
            }
        }
    });
    action
}
