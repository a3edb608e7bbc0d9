//! Configs of every family read from both formats, RoPE scalings and their frequencies.

use super::*;

fn hf(json: &str) -> Result<ModelConfig, ModelError> {
    ModelConfig::from_hf_json(Path::new("x"), json)
}

const BASE: &str = r#""num_hidden_layers":12,"hidden_size":64,
    "intermediate_size":128,"num_attention_heads":4,"vocab_size":300,"rms_norm_eps":1e-5,
    "max_position_embeddings":512"#;

#[test]
fn hf_config_reads_defaults() -> Result<(), ModelError> {
    let c = hf(&format!(r#"{{"model_type":"llama",{BASE}}}"#))?;
    assert_eq!(c.num_kv_heads, 4);
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.rope.theta, 10_000.0);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.rope.style, RopeStyle::Halves);
    assert_eq!(c.attention_scale, 0.25);
    assert_eq!(c.window(0), None);
    Ok(())
}

#[test]
fn hf_config_rejects_bad_heads_and_other_models() {
    let json = r#"{"model_type":"llama","num_hidden_layers":2,"hidden_size":64,
        "intermediate_size":128,"num_attention_heads":4,"num_key_value_heads":3,
        "vocab_size":300,"rms_norm_eps":1e-5,"max_position_embeddings":512}"#;
    let err = hf(json).unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
    let err = hf(&json.replace("\"llama\"", "\"gpt2\"")).unwrap_err();
    assert!(err.to_string().contains("\"gpt2\""), "{err}");
    assert!(
        err.to_string()
            .contains("qwen2, qwen3, gemma2, gemma3, phi3"),
        "{err}"
    );
    let err = hf(&json.replace("\"llama\"", "\"mixtral\"")).unwrap_err();
    assert!(err.to_string().contains("mixture-of-experts"), "{err}");
}

/// What each family's config makes of the block, one row per family.
#[test]
fn families_read_their_traits() -> Result<(), ModelError> {
    // (model_type and extra fields, family, bias, norm offset, tied, windows of layers 0..6)
    type Row = (
        &'static str,
        &'static str,
        bool,
        f32,
        bool,
        [Option<usize>; 6],
    );
    let none = [None; 6];
    let rows: &[Row] = &[
        (
            r#""model_type":"mistral","sliding_window":4096"#,
            "llama",
            false,
            0.0,
            false,
            [Some(4096); 6],
        ),
        (
            r#""model_type":"qwen2","sliding_window":4096,"use_sliding_window":false,"tie_word_embeddings":true"#,
            "qwen2",
            true,
            0.0,
            true,
            none,
        ),
        (
            r#""model_type":"qwen3","head_dim":32,"sliding_window":null"#,
            "qwen3",
            false,
            0.0,
            false,
            none,
        ),
        (
            r#""model_type":"gemma3_text","sliding_window":512,"query_pre_attn_scalar":256"#,
            "gemma3",
            false,
            1.0,
            true,
            [Some(512), Some(512), Some(512), Some(512), Some(512), None],
        ),
        (
            r#""model_type":"gemma2","sliding_window":4096,"attn_logit_softcapping":50.0"#,
            "gemma2",
            false,
            1.0,
            true,
            [Some(4096), None, Some(4096), None, Some(4096), None],
        ),
        (
            r#""model_type":"phi3","sliding_window":2047"#,
            "phi3",
            false,
            0.0,
            false,
            [Some(2047); 6],
        ),
    ];
    for (extra, family, bias, offset, tied, windows) in rows {
        let c = hf(&format!("{{{extra},{BASE}}}"))?;
        assert_eq!(c.family.gguf_architecture, *family, "{extra}");
        assert_eq!(c.attention_bias, *bias, "{extra}");
        assert_eq!(c.norm_offset, *offset, "{extra}");
        assert_eq!(c.tie_word_embeddings, *tied, "{extra}");
        let got: Vec<_> = (0..6).map(|i| c.window(i)).collect();
        assert_eq!(got, windows.to_vec(), "{extra}");
    }
    let gemma = hf(&format!(
        r#"{{"model_type":"gemma3_text","query_pre_attn_scalar":256,"rope_local_base_freq":10000,{BASE}}}"#
    ))?;
    assert_eq!(gemma.attention_scale, 1.0 / 16.0);
    assert_eq!(gemma.rope.for_layer(true).0, 10_000.0);
    assert_eq!(gemma.embedding_scale(), Some(8.0));
    Ok(())
}

#[test]
fn layer_types_that_depart_from_the_pattern_are_refused() {
    let types: Vec<&str> = (0..12).map(|_| "full_attention").collect();
    let json = format!(
        r#"{{"model_type":"gemma3_text","sliding_window":512,"layer_types":{},{BASE}}}"#,
        serde_json::to_string(&types).unwrap()
    );
    let err = hf(&json).unwrap_err();
    assert!(err.to_string().contains("layer_types[0]"), "{err}");
}

#[test]
fn rope_scaling_is_read_and_unknown_kinds_refused() -> Result<(), ModelError> {
    let llama3 = r#""rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#;
    let c = hf(&format!(r#"{{"model_type":"llama",{llama3},{BASE}}}"#))?;
    assert!(matches!(
        c.rope.scaling,
        RopeScaling::Llama3 {
            original_context: 8192,
            ..
        }
    ));
    let err = hf(&format!(
        r#"{{"model_type":"llama","rope_scaling":{{"type":"longrope","factor":2}},{BASE}}}"#
    ))
    .unwrap_err();
    assert!(err.to_string().contains("longrope"), "{err}");
    Ok(())
}

/// Llama 3's frequency rule on known points: high frequencies kept, low ones divided by the
/// factor, the band between blended; the same divisors given as file factors agree.
#[test]
fn llama3_frequencies_and_file_factors_agree() {
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 8192,
    };
    let (plain, _) = rope_inv_freq(128, 500_000.0, &RopeScaling::None, None);
    let (scaled, mscale) = rope_inv_freq(128, 500_000.0, &scaling, None);
    assert_eq!(mscale, 1.0);
    assert_eq!(scaled[0], plain[0]);
    assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    let blended =
        (0..64).filter(|&i| scaled[i] != plain[i] && (scaled[i] - plain[i] / 8.0).abs() > 1e-12);
    assert!(blended.count() > 0);
    let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
    let (from_file, _) = rope_inv_freq(128, 500_000.0, &RopeScaling::FileFactors, Some(&factors));
    for (a, b) in from_file.iter().zip(&scaled) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    }
}

/// YaRN's ramp: the first (fast) frequencies extrapolate, the last interpolate, and cos/sin
/// scale by 0.1 ln(factor) + 1.
#[test]
fn yarn_ramps_between_extrapolation_and_interpolation() {
    let scaling = RopeScaling::Yarn {
        factor: 4.0,
        original_context: 32768,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: None,
    };
    let (plain, _) = rope_inv_freq(128, 1_000_000.0, &RopeScaling::None, None);
    let (yarn, mscale) = rope_inv_freq(128, 1_000_000.0, &scaling, None);
    assert_eq!(yarn[0], plain[0]);
    assert!((yarn[63] - plain[63] / 4.0).abs() < 1e-12);
    assert!((mscale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
}
