//! Choosing what a download fetches: the files training (and Python tools sharing the cache) read
//! — config, tokenizer files, generation config, chat template — and the weights: the safetensors
//! shards the index names, a lone `model.safetensors`, or else the PyTorch `.bin` files.

use super::HubError;

/// Files besides the weights that training (and Python tools sharing the cache) read.
pub(crate) const SUPPORT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// One file a download fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path inside the repo, e.g. `model-00001-of-00002.safetensors`.
    pub path: String,
    /// Size in bytes, from the repo's file tree.
    pub bytes: u64,
}

/// The training files among a repo's root-level files, and which weight format they are.
pub(crate) fn select_files(
    repo: &str,
    tree: &[(String, u64)],
) -> Result<(Vec<PlannedFile>, &'static str), HubError> {
    let root: Vec<&(String, u64)> = tree.iter().filter(|(p, _)| !p.contains('/')).collect();
    let has = |name: &str| root.iter().any(|(p, _)| p == name);
    let weight = |p: &str, ext: &str| {
        p.ends_with(ext) && !p.starts_with("adapter_") && !p.starts_with("consolidated")
    };
    let (kind, index, ext) = if root.iter().any(|(p, _)| weight(p, ".safetensors")) {
        (
            "safetensors",
            "model.safetensors.index.json",
            ".safetensors",
        )
    } else if root
        .iter()
        .any(|(p, _)| weight(p, ".bin") && p.starts_with("pytorch_model"))
    {
        ("pytorch .bin", "pytorch_model.bin.index.json", ".bin")
    } else {
        let gguf = tree.iter().any(|(p, _)| p.ends_with(".gguf"));
        return Err(HubError::NoWeights {
            repo: repo.to_owned(),
            hint: if gguf {
                "; it has GGUF files: download one and turn it into a model folder with `finetune convert FILE.gguf OUT`".into()
            } else {
                "; pick the original (non-quantized) model repo instead".into()
            },
        });
    };
    // Without an index, a lone `model.safetensors` / `pytorch_model.bin` is the checkpoint even
    // when other weight files sit beside it; with an index, the index decides (see `download`).
    let single = if ext == ".safetensors" {
        "model.safetensors"
    } else {
        "pytorch_model.bin"
    };
    let only_single = !has(index) && has(single);
    let wanted = |p: &str| {
        if SUPPORT_FILES.contains(&p) || p == index {
            return true;
        }
        if !weight(p, ext) || (ext == ".bin" && !p.starts_with("pytorch_model")) {
            return false;
        }
        !only_single || p == single
    };
    let mut files: Vec<PlannedFile> = root
        .iter()
        .filter(|(p, _)| wanted(p))
        .map(|(p, b)| PlannedFile {
            path: p.clone(),
            bytes: *b,
        })
        .collect();
    // Index first (it names the shards), then weights, then small files, config.json last so a
    // snapshot only looks like a model once everything else is there.
    let rank = |p: &str| {
        if p == index {
            0
        } else if p.ends_with(ext) {
            1
        } else if p == "config.json" {
            3
        } else {
            2
        }
    };
    files.sort_by(|a, b| (rank(&a.path), &a.path).cmp(&(rank(&b.path), &b.path)));
    Ok((files, kind))
}

/// File names in a shard index's `weight_map`, sorted, each once.
pub(crate) fn shard_names(index: &std::path::Path) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|source| HubError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    crate::model::weights::shard_index_names(&text).map_err(|reason| HubError::Protocol { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(names: &[&str]) -> Vec<(String, u64)> {
        names.iter().map(|n| (n.to_string(), 10)).collect()
    }

    fn paths(files: &[PlannedFile]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn picks_safetensors_and_support_files_only() {
        let (files, kind) = select_files(
            "o/m",
            &tree(&[
                "README.md",
                ".gitattributes",
                "config.json",
                "tokenizer.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "consolidated.safetensors",
                "pytorch_model.bin",
                "onnx/model.onnx",
                "original/consolidated.00.pth",
            ]),
        )
        .unwrap();
        assert_eq!(kind, "safetensors");
        assert_eq!(
            paths(&files),
            [
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "tokenizer.json",
                "config.json"
            ]
        );
    }

    #[test]
    fn falls_back_to_bin_and_explains_gguf_only() {
        let (files, kind) = select_files(
            "o/m",
            &tree(&["config.json", "pytorch_model.bin", "training_args.bin"]),
        )
        .unwrap();
        assert_eq!(kind, "pytorch .bin");
        assert_eq!(paths(&files), ["pytorch_model.bin", "config.json"]);
        let err = select_files("o/m", &tree(&["m.Q4_K_M.gguf"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("finetune convert"), "{err}");
    }
}
