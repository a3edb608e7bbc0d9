//! Tenants stay apart (issue #43), through the official `openai` Python client against real
//! `strata serve` clusters with two named API keys: one key's prompt is never a prefix-cache hit
//! for another (`cached_tokens` 0, no hit in `/metrics`, no faster first token) unless
//! `--share-prefix-cache` says so, and keys fail closed (a removed key beside a malformed line, a
//! deleted keys file). The checks are in `python/tenants.py`.

mod common;

#[test]
fn the_prefix_cache_and_the_keys_keep_tenants_apart() {
    common::run_python_check("tenants.py", 3, "the tenant checks");
}
