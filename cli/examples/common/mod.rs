#![allow(dead_code)]

//! What every example needs: the strata binary, the default model, and a local cluster.

use strata_harness::{LocalCluster, LocalOptions};

/// Starts `workers` local CPU workers on the default model (fetched if needed).
pub async fn local_cluster(workers: usize) -> Result<LocalCluster, Box<dyn std::error::Error>> {
    Ok(LocalCluster::start(local_options(workers)?).await?)
}

pub fn local_options(workers: usize) -> Result<LocalOptions, Box<dyn std::error::Error>> {
    let binary = strata_harness::local::strata_binary()?;
    let model = strata_harness::model_cache::fetch_default_model(false)?;
    Ok(LocalOptions::new(binary, workers, model))
}

/// Prints a check and fails the example if it does not hold.
pub fn check(ok: bool, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    if ok {
        println!("  ✓ {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}
