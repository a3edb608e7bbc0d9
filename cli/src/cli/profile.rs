//! `strata profile`: the original design's profiling phases, run against fresh local workers or a
//! running coordinator.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use strata_harness::profile::{profile, Summary, Target};

use super::cluster::ClusterArgs;

#[derive(Debug, Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Write the phases and the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prompts in the batch phase.
    #[arg(long, default_value_t = 4)]
    batch: usize,
}

pub async fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let target = match &args.cluster.coordinator {
        Some(url) => {
            println!(
                "(cold and warm start need fresh workers: run with --local N to include them)"
            );
            Target::Remote(url.clone(), args.cluster.security.load_client()?)
        }
        None => Target::Local(args.cluster.local_options(true, Vec::new())?),
    };
    let phases = profile(target, args.batch, |p| println!("{}", p.render())).await?;
    let summary = Summary::of(&phases);
    println!("{}", summary.render());
    if let Some(path) = &args.json {
        let out = json!({ "phases": phases, "summary": summary });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
