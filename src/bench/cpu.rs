//! What the CPU offers, found at run time, for `finetune bench` (issue 22: a figure is only
//! comparable with the CPU it came from): the model name and the matrix features present, and the
//! bf16 matmul path this build takes on it.

/// The CPU of a benchmark.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CpuInfo {
    /// The model name the OS reports.
    pub model: String,
    /// Logical cores the compute pool uses.
    pub threads: usize,
    /// Matrix/vector features present: "amx-bf16", "amx-tile", "avx512bf16", "avx512f",
    /// "avx2", "fma", "neon" (whichever apply).
    pub features: Vec<&'static str>,
    /// The bf16 matmul kernel this build runs here.
    pub bf16_matmul: &'static str,
    /// The f32 frozen products' library: "accelerate" (macOS) or the `gemm` crate.
    pub f32_matmul: &'static str,
    /// The fused attention's products in the bf16 mode: "amx-bf16" (bf16-rounded operands on
    /// the tiles) or "f32".
    pub bf16_attention: &'static str,
}

/// Detects the CPU's features (cpuid on x86-64).
pub fn cpu_info() -> CpuInfo {
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        // AMX is reported by cpuid leaf 7, sub-leaf 0, EDX bits 22 (AMX-BF16) and 24 (AMX-TILE).
        // (cpuid is safe to call on x86-64; leaf 7 is valid when leaf 0 says so.)
        let max_leaf = core::arch::x86_64::__cpuid(0).eax;
        if max_leaf >= 7 {
            let edx = core::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) != 0 {
                features.push("amx-bf16");
            }
            if edx & (1 << 24) != 0 {
                features.push("amx-tile");
            }
        }
        if std::is_x86_feature_detected!("avx512bf16") {
            features.push("avx512bf16");
        }
        if std::is_x86_feature_detected!("avx512f") {
            features.push("avx512f");
        }
        if std::is_x86_feature_detected!("avx2") {
            features.push("avx2");
        }
        if std::is_x86_feature_detected!("fma") {
            features.push("fma");
        }
    }
    #[cfg(target_arch = "aarch64")]
    features.push("neon");
    CpuInfo {
        model: super::generate::cpu_name(),
        threads: rayon::current_num_threads(),
        features,
        bf16_matmul: crate::model::bf16::kernel_name(),
        f32_matmul: f32_matmul(),
        bf16_attention: if crate::model::kernels::bf16_attention_products() {
            "amx-bf16"
        } else {
            "f32"
        },
    }
}

fn f32_matmul() -> &'static str {
    #[cfg(target_os = "macos")]
    if crate::model::kernels::cpu::accelerate::enabled() {
        return "accelerate";
    }
    "gemm"
}

#[cfg(test)]
mod tests {
    #[test]
    fn features_match_the_kernel_choice() {
        let info = super::cpu_info();
        assert!(!info.model.is_empty() && info.threads > 0);
        let amx = info.features.contains(&"amx-bf16") && info.features.contains(&"amx-tile");
        let avx512 = info.features.contains(&"avx512bf16") && info.features.contains(&"avx512f");
        // AMX also needs the OS's grant, so a CPU with it may still take the AVX-512 path.
        match info.bf16_matmul {
            "amx-bf16" => assert!(amx),
            "avx512bf16" => assert!(avx512),
            other => assert_eq!(other, "portable"),
        }
        if !amx {
            assert_eq!(info.bf16_matmul == "avx512bf16", avx512);
        }
    }
}
