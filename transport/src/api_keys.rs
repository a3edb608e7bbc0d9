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
    /// The file's bytes the table was parsed from, so an unchanged file is not parsed again;
    /// `None` while the file cannot be read (the table is empty then).
    source: Option<Vec<u8>>,
}

/// What a reread of the keys file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    /// The keys changed.
    pub changed: bool,
    /// Lines that were skipped, each with its number and why (the other lines' keys hold).
    pub skipped: Vec<String>,
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
    /// least 16 printable characters). At start every line must be right (a repeated name or key
    /// is an error too); rereads while serving skip the wrong lines instead (see [`Self::reload`]).
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let source = read(path)?;
        let table = parse_strict(&source).map_err(|why| invalid_file(path, why))?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            keys: RwLock::new(Arc::new(table)),
        })
    }

    /// Checks the text of a keys file without keeping it.
    pub fn validate(text: &str) -> Result<(), TransportError> {
        parse_strict(text.as_bytes())
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
                source: None,
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

    /// Rereads the file. Keys fail closed: the table becomes exactly the well-formed lines of the
    /// file as it is now (a malformed line is skipped and reported, never a reason to keep keys
    /// the file no longer holds), and a file that cannot be read leaves no key valid until it can
    /// be (the error is returned).
    pub fn reload(&self) -> Result<Reload, TransportError> {
        let Some(path) = &self.path else {
            return Ok(Reload::default());
        };
        let source = match read(path) {
            Ok(source) => source,
            Err(e) => {
                self.replace(KeyTable::default());
                return Err(e);
            }
        };
        if self.table().source.as_ref() == Some(&source) {
            return Ok(Reload::default());
        }
        let (table, skipped) = parse(&source);
        let changed = self.table().entries != table.entries;
        self.replace(table);
        Ok(Reload { changed, skipped })
    }

    /// Rereads the file every `RELOAD_INTERVAL` for as long as `self` is in use elsewhere, logging
    /// each change, each skipped line, and each reread of a file that cannot be read (no key is
    /// valid then).
    pub fn watch(self: &Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_INTERVAL).await;
                let Some(keys) = weak.upgrade() else {
                    return;
                };
                match keys.reload() {
                    Ok(reload) => {
                        for line in &reload.skipped {
                            tracing::warn!(line = %line, "API keys file: line skipped");
                        }
                        if reload.changed {
                            tracing::info!(names = ?keys.names(), "API keys reloaded");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "API keys file unreadable: every client key is refused until it can be read");
                    }
                }
            }
        });
    }

    fn replace(&self, table: KeyTable) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
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

/// Every line right, or the first wrong one.
fn parse_strict(source: &[u8]) -> Result<KeyTable, String> {
    if std::str::from_utf8(source).is_err() {
        return Err("not UTF-8".into());
    }
    let (table, mut skipped) = parse(source);
    if skipped.is_empty() {
        Ok(table)
    } else {
        Err(skipped.swap_remove(0))
    }
}

/// The keys of the well-formed lines, and why each other line was skipped. A name used again
/// keeps its first line; a key given on two lines is valid on neither (which name it stands for
/// is unknown).
fn parse(source: &[u8]) -> (KeyTable, Vec<String>) {
    let text = String::from_utf8_lossy(source);
    let mut entries: Vec<(Arc<str>, AuthToken, usize)> = Vec::new();
    let mut skipped = Vec::new();
    let mut doubled = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line, &entries) {
            Ok((name, key)) => entries.push((name.into(), key, i + 1)),
            Err(Skip::Doubled(key, why)) => {
                doubled.push(key);
                skipped.push(format!("line {}: {why}", i + 1));
            }
            Err(Skip::Wrong(why)) => skipped.push(format!("line {}: {why}", i + 1)),
        }
    }
    let entries = entries
        .into_iter()
        .filter(|(name, key, line)| {
            let keep = !doubled.contains(key);
            if !keep {
                skipped.push(format!(
                    "line {line}: {name:?} has a key another line gives too"
                ));
            }
            keep
        })
        .map(|(name, key, _)| (name, key))
        .collect();
    let table = KeyTable {
        entries,
        source: Some(source.to_vec()),
    };
    (table, skipped)
}

enum Skip {
    Wrong(String),
    /// The line's key is an earlier line's too.
    Doubled(AuthToken, String),
}

fn parse_line<'a>(
    line: &'a str,
    earlier: &[(Arc<str>, AuthToken, usize)],
) -> Result<(&'a str, AuthToken), Skip> {
    let mut fields = line.split_whitespace();
    let (Some(name), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(Skip::Wrong("expected `NAME KEY`".into()));
    };
    check_name(name).map_err(Skip::Wrong)?;
    let key = AuthToken::new(key).map_err(|e| {
        Skip::Wrong(match e {
            TransportError::Invalid(why) => why,
            other => other.to_string(),
        })
    })?;
    if earlier.iter().any(|(n, _, _)| &**n == name) {
        return Err(Skip::Wrong(format!("the name {name:?} is used twice")));
    }
    if earlier.iter().any(|(_, k, _)| *k == key) {
        let why = format!("{name:?} has the same key as an earlier line");
        return Err(Skip::Doubled(key, why));
    }
    Ok((name, key))
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
    const C: &str = "cccccccccccccccccccccccc";

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
    fn reload_revokes_and_fails_closed() {
        let (_dir, path) = file(&format!("alice {A}\nbob {B}\n"));
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(
            keys.reload().unwrap(),
            Reload::default(),
            "an unchanged file"
        );
        std::fs::write(&path, format!("bob {B}\n")).unwrap();
        assert!(keys.reload().unwrap().changed);
        assert_eq!(keys.check(A.as_bytes()), None);
        assert_eq!(keys.check(B.as_bytes()).as_deref(), Some("bob"));

        // A typo beside the removal of a key still removes it; the good lines hold.
        std::fs::write(&path, format!("alice {A}\nbob {B}\n")).unwrap();
        keys.reload().unwrap();
        let mut text = format!("bob {B}\ncarol\n").into_bytes();
        text.push(0xff);
        text.extend_from_slice(format!("d {C}\n").as_bytes());
        std::fs::write(&path, text).unwrap();
        let reload = keys.reload().unwrap();
        assert!(reload.changed);
        assert_eq!(reload.skipped.len(), 2, "{reload:?}");
        assert!(
            reload.skipped[0].starts_with("line 2: expected"),
            "{reload:?}"
        );
        assert_eq!(keys.check(A.as_bytes()), None);
        assert_eq!(keys.check(B.as_bytes()).as_deref(), Some("bob"));
        assert_eq!(keys.check(C.as_bytes()), None);

        // A key on two lines stands for neither name.
        std::fs::write(&path, format!("bob {B}\neve {B}\ncarol {C}\n")).unwrap();
        let reload = keys.reload().unwrap();
        assert_eq!(reload.skipped.len(), 2, "{reload:?}");
        assert_eq!(keys.check(B.as_bytes()), None);
        assert_eq!(keys.check(C.as_bytes()).as_deref(), Some("carol"));

        // No file, no keys; back when it is readable again.
        std::fs::remove_file(&path).unwrap();
        assert!(keys.reload().is_err());
        assert_eq!(keys.check(C.as_bytes()), None);
        assert!(keys.names().is_empty());
        std::fs::write(&path, format!("carol {C}\n")).unwrap();
        assert!(keys.reload().unwrap().changed);
        assert_eq!(keys.check(C.as_bytes()).as_deref(), Some("carol"));
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
