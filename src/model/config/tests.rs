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
