//! Llama 3.1's JSON tool-call format through its own chat template (issue #43), end to end with the
//! official `openai` client on a random-weight GGUF that carries Meta's template: a forced call
//! comes back as a call and renders into the next turn, a structured reply with a `name` stays
//! content, cut replies say `length`, stop strings under a schema and unknown roles are refused.
//! The checks are in `python/llama3_tools.py`. A test binary of its own: the tests of one binary
//! run at once, and a server more beside the Qwen checks of `families.rs` starved them on 2 cores.

mod common;

#[test]
fn llama3_tool_calls_through_the_openai_api() {
    common::run_python_check("llama3_tools.py", 5, "the Llama 3.1 tool-call checks");
}
