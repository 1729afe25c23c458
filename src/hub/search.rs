//! Searching the Hub for text-generation models and reading one model's details: architecture
//! (config.json's `architectures[0]`), parameters (the Hub's safetensors metadata), the bytes a
//! training download takes (from the file tree), gated/license, downloads and likes, and whether
//! FineTune can train it.

use futures::StreamExt;
use hf_hub::repository::{ModelInfo, RepoTreeEntry};

use super::select::{select_files, PlannedFile};
use super::{Hub, HubError};
use crate::inspect::{format_bytes, format_count};
use crate::model::SUPPORTED_ARCHITECTURES;

/// How search results are ordered (always descending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchSort {
    /// Most downloaded (last 30 days) first; the default.
    #[default]
    Downloads,
    /// Highest trending score first.
    Trending,
    /// Most liked first.
    Likes,
    /// Most recently updated first.
    Updated,
}

impl SearchSort {
    /// The Hub API's field name.
    pub fn api_name(self) -> &'static str {
        match self {
            SearchSort::Downloads => "downloads",
            SearchSort::Trending => "trendingScore",
            SearchSort::Likes => "likes",
            SearchSort::Updated => "lastModified",
        }
    }
}

impl std::str::FromStr for SearchSort {
    type Err = String;

    /// `downloads`, `trending`, `likes` or `updated` (for `--sort`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "downloads" => Ok(SearchSort::Downloads),
            "trending" | "trendingscore" => Ok(SearchSort::Trending),
            "likes" => Ok(SearchSort::Likes),
            "updated" | "recent" | "lastmodified" => Ok(SearchSort::Updated),
            other => Err(format!(
                "unknown sort {other:?}; use downloads, trending, likes or updated"
            )),
        }
    }
}

/// One search request.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    /// Free text matched against model ids (empty = everything).
    pub text: String,
    /// Order of the results.
    pub sort: SearchSort,
    /// Only models of this user or organization.
    pub author: Option<String>,
    /// Keep only architectures FineTune trains ([`SUPPORTED_ARCHITECTURES`]).
    pub supported_only: bool,
    /// At most this many rows.
    pub limit: usize,
}

impl Default for SearchQuery {
    fn default() -> Self {
        Self {
            text: String::new(),
            sort: SearchSort::Downloads,
            author: None,
            supported_only: false,
            limit: 20,
        }
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRow {
    /// `org/name`.
    pub repo: String,
    /// `architectures[0]` of its config, when the Hub reports one.
    pub architecture: Option<String>,
    /// Parameter count, when the Hub's safetensors metadata came with the listing.
    pub parameters: Option<u64>,
    /// Downloads over the last 30 days.
    pub downloads: u64,
    /// Likes on the Hub.
    pub likes: u64,
    /// `Some("auto" | "manual")` when a license must be accepted first.
    pub gated: Option<String>,
    /// `Ok(())` when FineTune can train it, else why not.
    pub supported: Result<(), String>,
}

/// Everything the details pane shows about one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDetails {
    /// The model id, `org/name`.
    pub repo: String,
    /// The commit the requested revision points at.
    pub commit: Option<String>,
    /// `architectures[0]` of its config.json, e.g. `LlamaForCausalLM`.
    pub architecture: Option<String>,
    /// `model_type` of its config.json, e.g. `llama`.
    pub model_type: Option<String>,
    /// Total parameters from the Hub's safetensors metadata.
    pub parameters: Option<u64>,
    /// Parameters per stored dtype, e.g. `[("BF16", 134515008)]`.
    pub parameters_by_dtype: Vec<(String, u64)>,
    /// `Some("auto" | "manual")` when gated.
    pub gated: Option<String>,
    /// The license tag, e.g. `apache-2.0`.
    pub license: Option<String>,
    /// Downloads over the last 30 days.
    pub downloads: u64,
    /// Likes on the Hub.
    pub likes: u64,
    /// The Hub's task tag, e.g. `text-generation`.
    pub pipeline_tag: Option<String>,
    /// The files a download fetches, with sizes.
    pub files: Vec<PlannedFile>,
    /// Sum of `files` sizes: what the download adds to the disk.
    pub download_bytes: u64,
    /// Whether the repo holds safetensors, only .bin, or neither (GGUF-only repos).
    pub weights: Result<&'static str, String>,
    /// `Ok(())` when FineTune can train it, else why not.
    pub supported: Result<(), String>,
    /// The model's page (where a gated license is accepted).
    pub url: String,
}

fn architecture_of(info: &ModelInfo) -> Option<String> {
    let config = info.config.as_ref()?;
    config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .map(str::to_owned)
}

fn gated_of(info: &ModelInfo) -> Option<String> {
    match info.gated.as_ref()? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(true) => Some("auto".into()),
        _ => None,
    }
}

fn license_of(info: &ModelInfo) -> Option<String> {
    info.card_data
        .as_ref()
        .and_then(|c| c.get("license"))
        .and_then(|l| l.as_str())
        .map(str::to_owned)
        .or_else(|| {
            info.tags
                .as_ref()?
                .iter()
                .find_map(|t| t.strip_prefix("license:").map(str::to_owned))
        })
}

/// `Ok(())` if FineTune trains `architecture`, else the reason.
pub(crate) fn support_of(architecture: Option<&str>) -> Result<(), String> {
    match architecture {
        Some(a) if SUPPORTED_ARCHITECTURES.contains(&a) => Ok(()),
        Some(a) => Err(format!(
            "{a} is not supported (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        )),
        None => Err("no transformers config.json architecture".into()),
    }
}

fn row_of(info: &ModelInfo) -> SearchRow {
    let architecture = architecture_of(info);
    SearchRow {
        repo: info.id.clone(),
        supported: support_of(architecture.as_deref()),
        architecture,
        parameters: info.safetensors.as_ref().map(|s| s.total),
        downloads: info.downloads.unwrap_or(0),
        likes: info.likes.unwrap_or(0),
        gated: gated_of(info),
    }
}

impl Hub {
    /// Text-generation models matching `query`, in the Hub's order for `query.sort`.
    pub fn search(&self, query: &SearchQuery) -> Result<Vec<SearchRow>, HubError> {
        let limit = query.limit.max(1);
        // Unsupported models are dropped after the fact, so ask for more of them.
        let fetch = if query.supported_only {
            (limit * 4).min(500)
        } else {
            limit
        };
        let text = query.text.trim();
        let rows = self.runtime.block_on(async {
            let stream = self
                .client
                .list_models()
                .maybe_search((!text.is_empty()).then(|| text.to_owned()))
                .maybe_author(query.author.clone().filter(|a| !a.trim().is_empty()))
                .sort(query.sort.api_name())
                .pipeline_tag("text-generation")
                .fetch_config(true)
                .limit(fetch)
                .send()?;
            let mut stream = Box::pin(stream);
            let mut rows = Vec::new();
            while let Some(info) = stream.next().await {
                let row = row_of(&info?);
                if query.supported_only && row.supported.is_err() {
                    continue;
                }
                rows.push(row);
                if rows.len() >= limit {
                    break;
                }
            }
            Ok::<_, hf_hub::HFError>(rows)
        });
        rows.map_err(|e| self.map_error("", None, e))
    }

    /// The model info of `repo` at `revision` (default `main`) and its file tree (path, bytes) at
    /// the commit the info names: one model-info call and one tree listing.
    pub(super) fn info_and_tree(
        &self,
        repo: &str,
        revision: Option<&str>,
    ) -> Result<(ModelInfo, Vec<(String, u64)>), HubError> {
        let handle = self.repo(repo);
        let result = self.runtime.block_on(async {
            let info = handle
                .info()
                .maybe_revision(revision.map(str::to_owned))
                .send()
                .await?;
            let tree_rev = info.sha.clone().or_else(|| revision.map(str::to_owned));
            let stream = handle.list_tree().maybe_revision(tree_rev).send()?;
            let mut stream = Box::pin(stream);
            let mut files = Vec::new();
            while let Some(entry) = stream.next().await {
                if let RepoTreeEntry::File { path, size, .. } = entry? {
                    files.push((path, size));
                }
            }
            Ok::<_, hf_hub::HFError>((info, files))
        });
        result.map_err(|e| self.map_error(repo, revision, e))
    }

    /// Details of `repo` at `revision` (default `main`): one model-info call and one tree listing.
    pub fn details(&self, repo: &str, revision: Option<&str>) -> Result<ModelDetails, HubError> {
        let (info, tree) = self.info_and_tree(repo, revision)?;
        let architecture = architecture_of(&info);
        let (files, weights) = match select_files(repo, &tree) {
            Ok((files, kind)) => (files, Ok(kind)),
            Err(e) => (Vec::new(), Err(e.to_string())),
        };
        let mut by_dtype: Vec<(String, u64)> = info
            .safetensors
            .as_ref()
            .map(|s| s.parameters.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        by_dtype.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let supported = support_of(architecture.as_deref()).and(match &weights {
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        });
        Ok(ModelDetails {
            repo: repo.to_owned(),
            commit: info.sha.clone(),
            model_type: info
                .config
                .as_ref()
                .and_then(|c| c.get("model_type"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            parameters: info.safetensors.as_ref().map(|s| s.total),
            parameters_by_dtype: by_dtype,
            gated: gated_of(&info),
            license: license_of(&info),
            downloads: info.downloads.unwrap_or(0),
            likes: info.likes.unwrap_or(0),
            pipeline_tag: info.pipeline_tag.clone(),
            download_bytes: files.iter().map(|f| f.bytes).sum(),
            files,
            weights,
            supported,
            url: self.model_url(repo),
            architecture,
        })
    }
}

/// Search rows as an aligned text table (for `finetune search`).
pub fn format_rows(rows: &[SearchRow]) -> String {
    let repo_w = rows.iter().map(|r| r.repo.len()).max().unwrap_or(4).max(4);
    let arch_w = rows
        .iter()
        .map(|r| r.architecture.as_deref().unwrap_or("?").len())
        .max()
        .unwrap_or(12)
        .max(12);
    let mut out = format!(
        "{:<repo_w$}  {:<arch_w$}  {:>7}  {:>9}  {:>6}  {:<6}  TRAIN\n",
        "MODEL", "ARCHITECTURE", "PARAMS", "DOWNLOADS", "LIKES", "GATED"
    );
    for r in rows {
        let params = r
            .parameters
            .map(|p| format_count(p as usize))
            .unwrap_or_else(|| "-".into());
        let train = match &r.supported {
            Ok(()) => "yes".to_owned(),
            Err(why) => format!("no: {why}"),
        };
        out.push_str(&format!(
            "{:<repo_w$}  {:<arch_w$}  {:>7}  {:>9}  {:>6}  {:<6}  {train}\n",
            r.repo,
            r.architecture.as_deref().unwrap_or("?"),
            params,
            format_count(r.downloads as usize),
            r.likes,
            r.gated.as_deref().unwrap_or("no"),
        ));
    }
    out
}

impl ModelDetails {
    /// A few lines for the CLI / details pane.
    pub fn summary(&self) -> String {
        let mut s = format!("{}\n", self.repo);
        let line = |k: &str, v: String| format!("  {k:<12} {v}\n");
        s += &line(
            "architecture",
            self.architecture.clone().unwrap_or_else(|| "?".into()),
        );
        s += &line(
            "parameters",
            self.parameters
                .map(|p| format_count(p as usize))
                .unwrap_or_else(|| "?".into()),
        );
        s += &line("download", format_bytes(self.download_bytes));
        s += &line(
            "gated",
            match &self.gated {
                Some(m) => format!("yes ({m}); accept the license at {}", self.url),
                None => "no".into(),
            },
        );
        s += &line(
            "license",
            self.license.clone().unwrap_or_else(|| "?".into()),
        );
        s += &line(
            "popularity",
            format!(
                "{} downloads, {} likes",
                format_count(self.downloads as usize),
                self.likes
            ),
        );
        s += &line(
            "trainable",
            match &self.supported {
                Ok(()) => "yes".into(),
                Err(e) => format!("no: {e}"),
            },
        );
        s
    }
}
