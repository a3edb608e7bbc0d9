//! Client API keys: named keys from a file, checked by the coordinator's client ports, reread while
//! serving so a key is added or revoked by editing the file. They are never the cluster's token:
//! workers refuse them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::{AuthToken, TransportError};

/// How often the keys file is reread: a revoked key stops working within this.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Longest key name: names appear in logs and as a metrics label.
const MAX_NAME_CHARS: usize = 64;

/// Named client keys. `Debug` shows the names only.
pub struct ApiKeys {
    /// Where the keys come from; `None` for keys made in memory (`single`).
    path: Option<PathBuf>,
    keys: RwLock<Arc<KeyTable>>,
}

#[derive(Default, PartialEq, Eq)]
struct KeyTable {
    entries: Vec<(Arc<str>, AuthToken)>,
    /// The file's bytes the table was parsed from, so an unchanged file is not parsed again.
    source: Vec<u8>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("path", &self.path)
            .field("names", &self.names())
            .finish()
    }
}

impl ApiKeys {
    /// Reads `path`: one key per line as `NAME KEY`; blank lines and lines starting with `#` are
    /// skipped. Names are `[A-Za-z0-9._-]`, up to 64 characters; keys follow the token rules (at
    /// least 16 printable characters). A repeated name or key is an error.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let source = read(path)?;
        let table = parse(&source).map_err(|why| invalid_file(path, why))?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            keys: RwLock::new(Arc::new(table)),
        })
    }

    /// Checks the text of a keys file without keeping it.
    pub fn validate(text: &str) -> Result<(), TransportError> {
        parse(text.as_bytes())
            .map(drop)
            .map_err(TransportError::Invalid)
    }

    /// One key, named `name`, held in memory only.
    pub fn single(name: &str, key: AuthToken) -> Result<Self, TransportError> {
        check_name(name).map_err(TransportError::Invalid)?;
        Ok(Self {
            path: None,
            keys: RwLock::new(Arc::new(KeyTable {
                entries: vec![(name.into(), key)],
                source: Vec::new(),
            })),
        })
    }

    /// The name of the key `presented` is, if it is one.
    pub fn check(&self, presented: &[u8]) -> Option<Arc<str>> {
        let table = self.table();
        // Every key is compared, so the time taken does not say which one was close.
        let mut found = None;
        for (name, key) in &table.entries {
            if key.matches(presented) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// The keys' names, in file order.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.table()
            .entries
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Rereads the file. `Ok(true)` when the keys changed; on an error the keys stay as they were.
    pub fn reload(&self) -> Result<bool, TransportError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let source = read(path)?;
        if source == self.table().source {
            return Ok(false);
        }
        let table = parse(&source).map_err(|why| invalid_file(path, why))?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(true)
    }

    /// Rereads the file every `RELOAD_INTERVAL` for as long as `self` is in use elsewhere, logging
    /// each change and each file that does not parse (the old keys stay then).
    pub fn watch(self: &Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(RELOAD_INTERVAL).await;
                let Some(keys) = weak.upgrade() else {
                    return;
                };
                match keys.reload() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(names = ?keys.names(), "API keys reloaded");
                    }
                    Ok(false) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "API keys file unusable; the previous keys stay");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    fn table(&self) -> Arc<KeyTable> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::Read {
        what: "the API keys",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn invalid_file(path: &Path, why: String) -> TransportError {
    TransportError::Invalid(format!("API keys file {}: {why}", path.display()))
}

fn check_name(name: &str) -> Result<(), String> {
    let fits = !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if fits {
        Ok(())
    } else {
        Err(format!(
            "key name {name:?} must be 1 to {MAX_NAME_CHARS} characters of [A-Za-z0-9._-]"
        ))
    }
}

fn parse(source: &[u8]) -> Result<KeyTable, String> {
    let text = std::str::from_utf8(source).map_err(|_| "not UTF-8".to_string())?;
    let mut entries: Vec<(Arc<str>, AuthToken)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |why: String| format!("line {}: {why}", i + 1);
        let mut fields = line.split_whitespace();
        let (Some(name), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(at("expected `NAME KEY`".into()));
        };
        check_name(name).map_err(at)?;
        let key = AuthToken::new(key).map_err(|e| {
            at(match e {
                TransportError::Invalid(why) => why,
                other => other.to_string(),
            })
        })?;
        if entries.iter().any(|(n, _)| &**n == name) {
            return Err(at(format!("the name {name:?} is used twice")));
        }
        if entries.iter().any(|(_, k)| *k == key) {
            return Err(at(format!("{name:?} has the same key as an earlier line")));
        }
        entries.push((name.into(), key));
    }
    Ok(KeyTable {
        entries,
        source: source.to_vec(),
    })
}

/// A line for a keys file: `name` and a fresh key.
pub fn new_key_line(name: &str) -> Result<(String, AuthToken), TransportError> {
    check_name(name).map_err(TransportError::Invalid)?;
    let key = AuthToken::generate()?;
    Ok((format!("{name} {}\n", key.as_str()), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbb";

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn keys_are_found_by_value_and_named() {
        let (_dir, path) = file(&format!("# clients\nalice {A}\n\n  bob\t{B}  \n"));
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(keys.check(A.as_bytes()).as_deref(), Some("alice"));
        assert_eq!(keys.check(B.as_bytes()).as_deref(), Some("bob"));
        assert_eq!(keys.check(b"cccccccccccccccccccccccc"), None);
        assert_eq!(keys.check(&A.as_bytes()[1..]), None);
        assert!(!format!("{keys:?}").contains(A));
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        for (text, expect) in [
            (format!("alice {A} extra\n"), "line 1: expected"),
            ("alice\n".to_string(), "line 1: expected"),
            (format!("al ice {A}\n"), "line 1: expected"),
            (format!("a/b {A}\n"), "line 1: key name"),
            ("alice short\n".to_string(), "line 1: the auth token has 5"),
            (format!("alice {A}\nalice {B}\n"), "line 2: the name"),
            (
                format!("alice {A}\nbob {A}\n"),
                "line 2: \"bob\" has the same key",
            ),
        ] {
            let (_dir, path) = file(&text);
            let err = ApiKeys::load(&path).unwrap_err().to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }

    #[test]
    fn reload_revokes_and_keeps_the_old_keys_on_a_bad_file() {
        let (_dir, path) = file(&format!("alice {A}\nbob {B}\n"));
        let keys = ApiKeys::load(&path).unwrap();
        assert!(!keys.reload().unwrap(), "an unchanged file is no change");
        std::fs::write(&path, format!("bob {B}\n")).unwrap();
        assert!(keys.reload().unwrap());
        assert_eq!(keys.check(A.as_bytes()), None);
        assert_eq!(keys.check(B.as_bytes()).as_deref(), Some("bob"));
        std::fs::write(&path, "bob\n").unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(keys.check(B.as_bytes()).as_deref(), Some("bob"));
        std::fs::remove_file(&path).unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(keys.check(B.as_bytes()).as_deref(), Some("bob"));
    }

    #[test]
    fn new_lines_parse_back() {
        let (line, key) = new_key_line("ci-bot").unwrap();
        let (_dir, path) = file(&line);
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(
            keys.check(key.as_str().as_bytes()).as_deref(),
            Some("ci-bot")
        );
        assert!(new_key_line("no spaces").is_err());
    }
}
