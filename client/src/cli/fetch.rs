//! `strata fetch-model`.

use clap::Args;

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Re-check the sha256 of a model already in the cache.
    #[arg(long)]
    verify: bool,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let path = strata_client::model_cache::fetch_default_model(args.verify)?;
    println!("{}", path.display());
    Ok(())
}
