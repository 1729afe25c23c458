#![cfg(test)]
//! config.json parsing against real configs of every supported family.

use super::*;

const LLAMA31: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "quantization_config": null, "some_future_key": {"x": 1}, "torch_dtype": "bfloat16"
}"#;

#[test]
fn reads_transformers4_convention_with_llama3_scaling() {
    let c = ModelConfig::from_json(LLAMA31).unwrap();
    assert_eq!(c.family, Family::Llama);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );
    assert_eq!(c.stored_dtype.as_deref(), Some("bfloat16"));
    // Llama-3.2-1B has 1.236B parameters.
    assert_eq!(c.parameter_count(), 1_235_814_400);
}

#[test]
fn reads_linear_scaling_old_type_key() {
    let text = LLAMA31.replace(
        r#""rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
        r#""rope_scaling": {"type": "linear", "factor": 4.0}"#,
    );
    let c = ModelConfig::from_json(&text).unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
}

#[test]
fn reads_transformers5_rope_parameters() {
    let text = r#"{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}"#;
    let c = ModelConfig::from_json(text).unwrap();
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert!(c.qk_norm);
    assert_eq!(c.head_dim, 8);
}

#[test]
fn unsupported_architecture_names_the_supported_ones() {
    let err =
        ModelConfig::from_json(r#"{"architectures": ["BertModel"], "vocab_size": 5}"#).unwrap_err();
    assert!(err.contains("BertModel"), "{err}");
    for a in SUPPORTED_ARCHITECTURES {
        assert!(err.contains(a), "{err}");
    }
}

#[test]
fn unsupported_rope_type_is_an_error() {
    let text = LLAMA31.replace("\"llama3\"", "\"yarn\"");
    assert!(ModelConfig::from_json(&text).unwrap_err().contains("yarn"));
}

#[test]
fn quantized_checkpoint_is_refused() {
    let text = LLAMA31.replace(
        "\"quantization_config\": null",
        "\"quantization_config\": {\"quant_method\": \"gptq\"}",
    );
    assert!(ModelConfig::from_json(&text).unwrap_err().contains("gptq"));
}

const GEMMA3_1B: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
    "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": null, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144}"#;

#[test]
fn gemma3_transformers4_config_reads_the_pattern_and_both_ropes() {
    let c = ModelConfig::from_json(GEMMA3_1B).unwrap();
    let v = &c.variant;
    assert!(v.norm_plus_one && v.sandwich_norms && c.qk_norm);
    assert_eq!(v.sliding_window, Some(512));
    // Every sixth layer is global: 5, 11, 17, 23.
    let global: Vec<usize> = (0..26).filter(|&i| !v.sliding_layers[i]).collect();
    assert_eq!(global, [5, 11, 17, 23]);
    assert_eq!(
        (c.rope_theta, &c.rope_scaling),
        (1e6, &RopeScaling::Default)
    );
    assert_eq!(v.local_rope, Some((10_000.0, RopeScaling::Default)));
    assert_eq!(v.embed_scale, Some((1152f64).sqrt()));
    assert_eq!(c.activation, Activation::GeluTanh);
    assert_eq!(c.eos_token_id, Some(1));
    // google/gemma-3-1b-it: 999,885,952 parameters (tied).
    assert_eq!(c.parameter_count(), 999_885_952);
}

#[test]
fn gemma3_multimodal_config_reads_its_sparse_text_config() {
    let text = r#"{"architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
        "model_type": "gemma3", "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
            "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}"#;
    let c = ModelConfig::from_json(text).unwrap();
    assert_eq!(c.architecture, "Gemma3ForConditionalGeneration");
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (8, 4, 256));
    assert_eq!(c.vocab_size, 262_208);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.variant.local_rope, Some((10_000.0, RopeScaling::Default)));
    assert_eq!(c.stored_dtype.as_deref(), Some("bfloat16"));
    assert!(c.tie_word_embeddings);
}

#[test]
fn gemma2_reads_softcaps_and_alternating_windows() {
    let text = r#"{"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
        "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
        "num_key_value_heads": 4, "query_pre_attn_scalar": 224, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000}"#;
    let c = ModelConfig::from_json(text).unwrap();
    let v = &c.variant;
    assert_eq!((v.attn_softcap, v.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!(v.query_pre_attn_scalar, Some(224.0));
    assert!(v.sliding_layers[0] && !v.sliding_layers[1] && v.sliding_layers[24]);
    assert!(!c.qk_norm && v.local_rope.is_none());
    // google/gemma-2-2b: 2,614,341,888 parameters.
    assert_eq!(c.parameter_count(), 2_614_341_888);
}

#[test]
fn phi4_mini_reads_longrope_and_partial_rotary() {
    let factors = |x: f64| {
        let v: Vec<String> = (0..48)
            .map(|i| format!("{}", x + i as f64 / 10.0))
            .collect();
        v.join(", ")
    };
    let text = format!(
        r#"{{"architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3",
        "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
        "rms_norm_eps": 1e-05, "rope_scaling": {{"long_factor": [{}], "short_factor": [{}],
        "type": "longrope"}}, "rope_theta": 10000.0, "sliding_window": 262144,
        "tie_word_embeddings": true, "vocab_size": 200064}}"#,
        factors(1.0),
        factors(0.5)
    );
    let c = ModelConfig::from_json(&text).unwrap();
    let v = &c.variant;
    assert!(v.fused_qkv && v.fused_gate_up);
    assert_eq!(v.rotary_dim, Some(96));
    let RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings,
        attention_factor,
    } = &c.rope_scaling
    else {
        panic!("{:?}", c.rope_scaling)
    };
    assert_eq!((short_factor.len(), long_factor.len()), (48, 48));
    assert_eq!(*original_max_position_embeddings, 4096.0);
    // √(1 + ln 32 / ln 4096)
    assert!(
        (attention_factor - 1.190_238_5).abs() < 1e-6,
        "{attention_factor}"
    );
    // microsoft/Phi-4-mini-instruct: 3,836,021,760 parameters (tied).
    assert_eq!(c.parameter_count(), 3_836_021_760);
}

#[test]
fn smollm3_derives_no_rope_layers_from_the_interval() {
    let text = r#"{"architectures": ["SmolLM3ForCausalLM"], "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 11008, "max_position_embeddings": 65536,
        "model_type": "smollm3", "no_rope_layer_interval": 4, "num_attention_heads": 16,
        "num_hidden_layers": 36, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 5000000.0, "sliding_window": null, "tie_word_embeddings": true,
        "use_sliding_window": false, "vocab_size": 128256}"#;
    let c = ModelConfig::from_json(text).unwrap();
    let v = &c.variant;
    let no_rope: Vec<usize> = (0..36).filter(|&i| !v.rope_layers[i]).collect();
    assert_eq!(no_rope, [3, 7, 11, 15, 19, 23, 27, 31, 35]);
    assert!(v.sliding_window.is_none() && !v.norm_plus_one);
    // HuggingFaceTB/SmolLM3-3B: 3,075,098,624 parameters.
    assert_eq!(c.parameter_count(), 3_075_098_624);
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_sized() {
    // Issue 20: a config claiming a 2^31-wide model must fail at parsing, naming the key.
    for (key, value) in [
        ("hidden_size", "2147483648"),
        ("vocab_size", "0"),
        ("num_hidden_layers", "100000"),
        ("max_position_embeddings", "1099511627776"),
    ] {
        let text = LLAMA31.replacen(
            &format!("\"{key}\": "),
            &format!("\"{key}\": {value}, \"x_{key}\": "),
            1,
        );
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(err.contains(key) && err.contains(value), "{key}: {err}");
    }
}
