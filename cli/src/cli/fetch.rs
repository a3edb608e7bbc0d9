//! `strata fetch-model`.

use clap::Args;
use strata_harness::model_cache::{fetch, known_names, KnownModel, KNOWN_MODELS};

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The model to fetch, by name (default: the default model); `--list` shows the names.
    name: Option<String>,
    /// Re-check the sha256 of a model already in the cache.
    #[arg(long)]
    verify: bool,
    /// List the models strata fetches by name, with their sizes and whether they are cached.
    #[arg(long)]
    list: bool,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    if args.list {
        for m in KNOWN_MODELS {
            let cached = std::fs::metadata(m.path()).is_ok_and(|meta| meta.len() == m.bytes);
            println!(
                "{:<20} {:>6} MB  {}{}",
                m.names[0],
                m.bytes / 1_000_000,
                m.file,
                if cached { "  (cached)" } else { "" }
            );
        }
        return Ok(());
    }
    let model = match args.name.as_deref() {
        None => KnownModel::default_model(),
        Some(name) => KnownModel::by_name(name).ok_or_else(|| {
            anyhow::anyhow!("unknown model {name:?}; strata fetches {}", known_names())
        })?,
    };
    let path = fetch(model, args.verify)?;
    println!("{}", path.display());
    Ok(())
}
