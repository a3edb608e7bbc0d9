//! `strata keys`: a new cluster's credentials, or one more node or client signed by its CAs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use strata_transport::keys;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct KeysArgs {
    #[command(subcommand)]
    issue: Option<Issue>,
    /// Directory for the new cluster: ca/ (the CAs' keys: keep it with you), node/ (for every
    /// worker and coordinator), client/ (for a client) and api-keys (for the coordinator).
    #[arg(long, default_value = "strata-keys")]
    out: PathBuf,
    /// A host name or IP address nodes will be dialed by (repeatable); loopback and `strata` are
    /// always included.
    #[arg(long = "host")]
    hosts: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Issue {
    /// Sign one more node identity (a worker's or a coordinator's) with the cluster's node CA.
    Node {
        /// The operator's `ca/` directory of the cluster.
        #[arg(long)]
        ca: PathBuf,
        /// Directory to write the node's files into.
        #[arg(long)]
        out: PathBuf,
        /// The node's name, in its certificate.
        #[arg(long)]
        name: String,
        /// A host name or IP address the node is dialed by (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Sign a client identity with the client CA and make it an API key.
    Client {
        /// The operator's `ca/` directory of the cluster.
        #[arg(long)]
        ca: PathBuf,
        /// Directory to write the client's files into.
        #[arg(long)]
        out: PathBuf,
        /// The client's name: in its certificate, and its key's name in the coordinator's logs and
        /// metrics.
        #[arg(long)]
        name: String,
        /// The coordinator's keys file to add the key to (otherwise the line is printed).
        #[arg(long)]
        api_keys: Option<PathBuf>,
    },
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    match args.issue {
        None => {
            let written = keys::generate(&args.out, &args.hosts)?;
            print_files(&written.files);
            println!("node certificate valid for: {}", written.names.join(", "));
            let out = args.out.display();
            println!(
                "keep {out}/{} with you: it signs new nodes and clients",
                keys::CA_DIR
            );
            println!(
                "copy {out}/{} to every worker and coordinator host and pass `--keys {out}/{}`;",
                keys::NODE_DIR,
                keys::NODE_DIR
            );
            println!(
                "the coordinator also takes `--api-keys {out}/{}`; clients take `--keys {out}/{}`",
                keys::API_KEYS_FILE,
                keys::CLIENT_DIR
            );
        }
        Some(Issue::Node {
            ca,
            out,
            name,
            hosts,
        }) => {
            let written = keys::issue_node(&ca, &out, &name, &hosts)?;
            print_files(&written.files);
            println!("node certificate valid for: {}", written.names.join(", "));
        }
        Some(Issue::Client {
            ca,
            out,
            name,
            api_keys,
        }) => {
            let (files, line) = keys::issue_client(&ca, &out, &name)?;
            print_files(&files);
            match api_keys {
                Some(path) => {
                    append(&path, &line)?;
                    println!(
                        "added key {name:?} to {} (a running coordinator rereads it within a second)",
                        path.display()
                    );
                }
                None => print!("add this line to the coordinator's --api-keys file:\n{line}"),
            }
        }
    }
    Ok(())
}

fn print_files(files: &[PathBuf]) {
    for file in files {
        println!("wrote {}", file.display());
    }
}

/// Appends `line` to the keys file at `path`, checking first that the result still parses.
fn append(path: &Path, line: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let addition = if text.is_empty() || text.ends_with('\n') {
        line.to_string()
    } else {
        format!("\n{line}")
    };
    strata_transport::ApiKeys::validate(&format!("{text}{addition}"))
        .with_context(|| format!("{} with the new key", path.display()))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(addition.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}
