//! `strata keys`: everything a secure cluster needs, in one directory.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Directory to write ca.pem, cert.pem, key.pem and token into (created if missing).
    #[arg(long, default_value = "strata-keys")]
    out: PathBuf,
    /// A host name or IP address nodes will be dialed by (repeatable); loopback and `strata` are
    /// always included.
    #[arg(long = "host")]
    hosts: Vec<String>,
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let keys = strata_transport::keys::generate(&args.out, &args.hosts)?;
    for file in &keys.files {
        println!("wrote {}", file.display());
    }
    println!("certificate valid for: {}", keys.names.join(", "));
    println!(
        "copy the directory to every host, then pass `--keys {}` to strata worker, coordinator and generate",
        args.out.display()
    );
    Ok(())
}
