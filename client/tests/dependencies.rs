//! A program that calls a cluster builds the wire format and the transport, not the model code.

use std::process::Command;

#[test]
fn the_client_crate_builds_no_model_worker_or_coordinator_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", "strata-client", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.contains("strata-proto"), "{tree}");
    for forbidden in [
        "candle",
        "strata-model",
        "strata-worker",
        "strata-coordinator",
        "tokenizers",
    ] {
        let found: Vec<&str> = tree.lines().filter(|l| l.contains(forbidden)).collect();
        assert!(found.is_empty(), "strata-client depends on {found:?}");
    }
}
