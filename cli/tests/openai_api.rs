//! The OpenAI-compatible HTTP API through the official `openai` Python client, against a real
//! `strata serve` (worker processes + coordinator): completions and streamed chat equal
//! `strata generate`'s greedy text, logprobs equal `strata generate --json`'s, `n` gives n choices,
//! penalties and logit_bias reach the sampler, a wrong key gets 401 in OpenAI's shape, `/metrics`
//! parses with prometheus_client and moves by exactly one request. The checks are in
//! `python/openai_api.py`.

mod common;

#[test]
fn the_openai_python_client_gets_strata_generates_text() {
    common::run_python_check("openai_api.py", 10, "the OpenAI API checks");
}
