//! The tensors of a model by role, with their names in GGUF and Hugging Face files and the shapes
//! a config implies: what the worker loads and what `synthetic` writes, from one table.

use crate::config::Family;
use crate::{ModelConfig, ModelFormat};

/// A tensor of a model, by what it does.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    TokenEmbedding,
    OutputNorm,
    Output,
    /// Llama 3's per-frequency RoPE divisors (GGUF `rope_freqs.weight`).
    RopeFreqs,
    AttnNorm(usize),
    Query(usize),
    Key(usize),
    Value(usize),
    /// q, k and v in one tensor, in that order (Phi-3).
    Qkv(usize),
    QueryBias(usize),
    KeyBias(usize),
    ValueBias(usize),
    /// Per-head RMSNorm weights of queries and keys (Qwen3, Gemma 3).
    QueryNorm(usize),
    KeyNorm(usize),
    AttnOutput(usize),
    /// The norm of attention's output before the residual add (Gemma).
    PostAttnNorm(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    /// Gate and up in one tensor, gate first (Phi-3).
    GateUp(usize),
    Down(usize),
    /// The norm of the feed-forward output before the residual add (Gemma).
    PostFfnNorm(usize),
}

impl Role {
    /// The tensor's name in a file of `format` of a model of `family`.
    pub fn name(self, format: ModelFormat, family: &Family) -> String {
        use Role::*;
        match format {
            ModelFormat::Gguf => match self {
                TokenEmbedding => "token_embd.weight".into(),
                OutputNorm => "output_norm.weight".into(),
                Output => "output.weight".into(),
                RopeFreqs => "rope_freqs.weight".into(),
                AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
                Query(i) => format!("blk.{i}.attn_q.weight"),
                Key(i) => format!("blk.{i}.attn_k.weight"),
                Value(i) => format!("blk.{i}.attn_v.weight"),
                Qkv(i) => format!("blk.{i}.attn_qkv.weight"),
                QueryBias(i) => format!("blk.{i}.attn_q.bias"),
                KeyBias(i) => format!("blk.{i}.attn_k.bias"),
                ValueBias(i) => format!("blk.{i}.attn_v.bias"),
                QueryNorm(i) => format!("blk.{i}.attn_q_norm.weight"),
                KeyNorm(i) => format!("blk.{i}.attn_k_norm.weight"),
                AttnOutput(i) => format!("blk.{i}.attn_output.weight"),
                PostAttnNorm(i) => format!("blk.{i}.post_attention_norm.weight"),
                FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
                Gate(i) => format!("blk.{i}.ffn_gate.weight"),
                Up(i) | GateUp(i) => format!("blk.{i}.ffn_up.weight"),
                Down(i) => format!("blk.{i}.ffn_down.weight"),
                PostFfnNorm(i) => format!("blk.{i}.post_ffw_norm.weight"),
            },
            ModelFormat::Safetensors => {
                let layer = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
                match self {
                    TokenEmbedding => "model.embed_tokens.weight".into(),
                    OutputNorm => "model.norm.weight".into(),
                    Output => "lm_head.weight".into(),
                    RopeFreqs => "rope_freqs.weight".into(),
                    AttnNorm(i) => layer(i, "input_layernorm.weight"),
                    Query(i) => layer(i, "self_attn.q_proj.weight"),
                    Key(i) => layer(i, "self_attn.k_proj.weight"),
                    Value(i) => layer(i, "self_attn.v_proj.weight"),
                    Qkv(i) => layer(i, "self_attn.qkv_proj.weight"),
                    QueryBias(i) => layer(i, "self_attn.q_proj.bias"),
                    KeyBias(i) => layer(i, "self_attn.k_proj.bias"),
                    ValueBias(i) => layer(i, "self_attn.v_proj.bias"),
                    QueryNorm(i) => layer(i, "self_attn.q_norm.weight"),
                    KeyNorm(i) => layer(i, "self_attn.k_norm.weight"),
                    AttnOutput(i) => layer(i, "self_attn.o_proj.weight"),
                    // Llama's `post_attention_layernorm` is the feed-forward's input norm; Gemma
                    // names that one `pre_feedforward_layernorm` and uses the first name for the
                    // norm of attention's output.
                    PostAttnNorm(i) => layer(i, "post_attention_layernorm.weight"),
                    FfnNorm(i) if family.sandwich_norms => {
                        layer(i, "pre_feedforward_layernorm.weight")
                    }
                    FfnNorm(i) => layer(i, "post_attention_layernorm.weight"),
                    Gate(i) => layer(i, "mlp.gate_proj.weight"),
                    Up(i) => layer(i, "mlp.up_proj.weight"),
                    GateUp(i) => layer(i, "mlp.gate_up_proj.weight"),
                    Down(i) => layer(i, "mlp.down_proj.weight"),
                    PostFfnNorm(i) => layer(i, "post_feedforward_layernorm.weight"),
                }
            }
        }
    }

    /// The shape the config implies, `[out, in]` for projections.
    pub fn expected_shape(self, c: &ModelConfig) -> Vec<usize> {
        use Role::*;
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        match self {
            TokenEmbedding | Output => vec![c.vocab_size, c.hidden_size],
            OutputNorm | AttnNorm(_) | FfnNorm(_) | PostAttnNorm(_) | PostFfnNorm(_) => {
                vec![c.hidden_size]
            }
            RopeFreqs => vec![c.head_dim / 2],
            Query(_) => vec![q, c.hidden_size],
            Key(_) | Value(_) => vec![kv, c.hidden_size],
            Qkv(_) => vec![q + 2 * kv, c.hidden_size],
            QueryBias(_) => vec![q],
            KeyBias(_) | ValueBias(_) => vec![kv],
            QueryNorm(_) | KeyNorm(_) => vec![c.head_dim],
            AttnOutput(_) => vec![c.hidden_size, q],
            Gate(_) | Up(_) => vec![c.intermediate_size, c.hidden_size],
            GateUp(_) => vec![2 * c.intermediate_size, c.hidden_size],
            Down(_) => vec![c.hidden_size, c.intermediate_size],
        }
    }
}

/// The tensors of layer `i` of a model of config `c`, in file order.
pub fn layer_roles(c: &ModelConfig, i: usize) -> Vec<Role> {
    use Role::*;
    let f = c.family;
    let mut roles = vec![AttnNorm(i)];
    if f.fused_tensors {
        roles.push(Qkv(i));
    } else {
        roles.extend([Query(i), Key(i), Value(i)]);
        if c.attention_bias {
            roles.extend([QueryBias(i), KeyBias(i), ValueBias(i)]);
        }
    }
    if f.qk_norm {
        roles.extend([QueryNorm(i), KeyNorm(i)]);
    }
    roles.push(AttnOutput(i));
    if f.sandwich_norms {
        roles.push(PostAttnNorm(i));
    }
    roles.push(FfnNorm(i));
    if f.fused_tensors {
        roles.push(GateUp(i));
    } else {
        roles.extend([Gate(i), Up(i)]);
    }
    roles.push(Down(i));
    if f.sandwich_norms {
        roles.push(PostFfnNorm(i));
    }
    roles
}

impl Role {
    /// Whether the tensor is a norm weight (stored near 1, or near 0 where the family's Hugging
    /// Face files hold `w - 1`).
    pub fn is_norm(self) -> bool {
        use Role::*;
        matches!(
            self,
            OutputNorm
                | AttnNorm(_)
                | FfnNorm(_)
                | PostAttnNorm(_)
                | PostFfnNorm(_)
                | QueryNorm(_)
                | KeyNorm(_)
        )
    }

    /// Whether the tensor is a bias.
    pub fn is_bias(self) -> bool {
        matches!(
            self,
            Role::QueryBias(_) | Role::KeyBias(_) | Role::ValueBias(_)
        )
    }
}
