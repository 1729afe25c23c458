//! The file types of the GGUF export and the per-tensor types llama.cpp's quantizer gives each
//! of them ([`tensor_type`]): 1-D tensors and GPT-2's positions in F32; for the k-quant mixes the
//! output matrix (the embedding when tied) in Q6_K and, in Q4_K_M / Q5_K_M, `attn_v` (or the fused
//! `attn_qkv`) and `ffn_down` of the first and last eighth of the layers and every third one
//! between in Q6_K; a matrix whose rows do not split into the type's blocks falls back as
//! llama.cpp's does (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, then F16).

use candle_core::quantized::GgmlDType;

/// The file types of a GGUF export, named as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufQuant {
    /// Every weight in f32 (4 bytes a weight).
    F32,
    /// Matrices in f16.
    F16,
    /// Matrices in bf16.
    Bf16,
    /// 8.5 bits a weight; nearly lossless.
    Q8_0,
    /// 4.5 bits a weight, the simplest 4-bit type.
    Q4_0,
    /// The k-quant mix most people run: Q4_K with Q6_K where it matters (~4.9 bits a weight).
    Q4KM,
    /// Q5_K with Q6_K where it matters (~5.7 bits a weight).
    Q5KM,
    /// 6.6 bits a weight.
    Q6K,
}

impl GgufQuant {
    /// Every type, smallest last.
    pub const ALL: [GgufQuant; 8] = [
        GgufQuant::F32,
        GgufQuant::F16,
        GgufQuant::Bf16,
        GgufQuant::Q8_0,
        GgufQuant::Q6K,
        GgufQuant::Q5KM,
        GgufQuant::Q4KM,
        GgufQuant::Q4_0,
    ];

    /// llama.cpp's name (`Q4_K_M`, `F16`, …), also used in file names.
    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F32 => "F32",
            GgufQuant::F16 => "F16",
            GgufQuant::Bf16 => "BF16",
            GgufQuant::Q8_0 => "Q8_0",
            GgufQuant::Q4_0 => "Q4_0",
            GgufQuant::Q4KM => "Q4_K_M",
            GgufQuant::Q5KM => "Q5_K_M",
            GgufQuant::Q6K => "Q6_K",
        }
    }

    /// The type named `text` (any case, `-` or `_`).
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim().to_ascii_uppercase().replace('-', "_");
        Self::ALL.into_iter().find(|q| q.name() == t)
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
            GgufQuant::Q5KM => 17,
            GgufQuant::Q6K => 18,
            GgufQuant::Bf16 => 32,
        }
    }

    /// The type of most matrices.
    fn base(self) -> GgmlDType {
        match self {
            GgufQuant::F32 => GgmlDType::F32,
            GgufQuant::F16 => GgmlDType::F16,
            GgufQuant::Bf16 => GgmlDType::BF16,
            GgufQuant::Q8_0 => GgmlDType::Q8_0,
            GgufQuant::Q4_0 => GgmlDType::Q4_0,
            GgufQuant::Q4KM => GgmlDType::Q4K,
            GgufQuant::Q5KM => GgmlDType::Q5K,
            GgufQuant::Q6K => GgmlDType::Q6K,
        }
    }

    /// One line for choosing.
    pub fn about(self) -> &'static str {
        match self {
            GgufQuant::F32 => "full precision, largest; for checking",
            GgufQuant::F16 => "half precision, as trained; the reference for quantizing",
            GgufQuant::Bf16 => "bfloat16, as trained; newer llama.cpp builds",
            GgufQuant::Q8_0 => "8-bit, practically lossless",
            GgufQuant::Q6K => "6-bit, very close to F16",
            GgufQuant::Q5KM => "5-bit mix, close to F16",
            GgufQuant::Q4KM => "4-bit mix, the usual choice for running locally",
            GgufQuant::Q4_0 => "4-bit, simplest; fastest on some CPUs",
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The replacement llama.cpp's quantizer takes when a row does not split into `ty`'s blocks.
fn fallback(ty: GgmlDType) -> GgmlDType {
    match ty {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    }
}

/// The type of tensor `name` (llama.cpp's name) with shape `shape` (rows, cols) in layer `layer`
/// of `n_layer`; `output` is true for the output matrix (the embedding when it is tied).
pub fn tensor_type(
    q: GgufQuant,
    name: &str,
    shape: &[usize],
    layer: Option<usize>,
    n_layer: usize,
    output: bool,
) -> GgmlDType {
    // llama.cpp quantizes neither 1-D tensors nor GPT-2's learned positions.
    if shape.len() < 2 || name == "rope_freqs.weight" || name == "position_embd.weight" {
        return GgmlDType::F32;
    }
    let k_mix = matches!(q, GgufQuant::Q4KM | GgufQuant::Q5KM);
    let mut ty = q.base();
    if matches!(
        q,
        GgufQuant::Q4_0 | GgufQuant::Q4KM | GgufQuant::Q5KM | GgufQuant::Q6K
    ) && output
    {
        ty = GgmlDType::Q6K;
    } else if k_mix
        && ["attn_v.weight", "attn_qkv.weight", "ffn_down.weight"]
            .iter()
            .any(|n| name.ends_with(n))
        && layer.is_some_and(|i| use_more_bits(i, n_layer))
    {
        // attn_qkv (GPT-2's fused projection) follows attn_v's rule, as today's llama.cpp does.
        ty = GgmlDType::Q6K;
    }
    let cols = shape[shape.len() - 1];
    while !cols.is_multiple_of(ty.block_size()) {
        ty = fallback(ty);
    }
    ty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_follow_llama_cpp() {
        // 24 layers: 0..3 and 21..24, and every third from 3 on (5, 8, 11, ...).
        let more: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn q4_k_m_types() {
        let t = |name: &str, shape: &[usize], layer, output| {
            tensor_type(GgufQuant::Q4KM, name, shape, layer, 24, output)
        };
        assert_eq!(
            t("blk.4.attn_q.weight", &[2048, 2048], Some(4), false),
            GgmlDType::Q4K
        );
        assert_eq!(
            t("blk.5.attn_v.weight", &[256, 2048], Some(5), false),
            GgmlDType::Q6K
        );
        assert_eq!(
            t("blk.4.attn_v.weight", &[256, 2048], Some(4), false),
            GgmlDType::Q4K
        );
        assert_eq!(
            t("blk.0.ffn_down.weight", &[2048, 8192], Some(0), false),
            GgmlDType::Q6K
        );
        assert_eq!(
            t("output.weight", &[32000, 2048], None, true),
            GgmlDType::Q6K
        );
        assert_eq!(
            t("token_embd.weight", &[32000, 2048], None, false),
            GgmlDType::Q4K
        );
        assert_eq!(
            t("blk.0.attn_norm.weight", &[2048], Some(0), false),
            GgmlDType::F32
        );
        // 576 columns do not split into 256-blocks: llama.cpp's fallbacks.
        assert_eq!(
            t("blk.4.attn_q.weight", &[576, 576], Some(4), false),
            GgmlDType::Q5_0
        );
        assert_eq!(
            t("output.weight", &[49152, 576], None, true),
            GgmlDType::Q8_0
        );
        // Not even 32-blocks: F16.
        assert_eq!(
            t("blk.4.ffn_down.weight", &[64, 144], Some(4), false),
            GgmlDType::F16
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(GgufQuant::parse("q4_k_m"), Some(GgufQuant::Q4KM));
        assert_eq!(GgufQuant::parse("Q8-0"), Some(GgufQuant::Q8_0));
        assert_eq!(GgufQuant::parse("bf16"), Some(GgufQuant::Bf16));
        assert_eq!(GgufQuant::parse("q3_k"), None);
    }
}
