//! Bearer credentials: the cluster's shared token (every worker port) or a client API key (the
//! coordinator's client ports), attached by callers and checked by servers on every call.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::{ApiKeys, TransportError};

/// Shortest token accepted: guessing must be out of reach.
const MIN_TOKEN_CHARS: usize = 16;

/// A cluster's shared secret. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl AuthToken {
    /// Checks that `token` is long enough and fits in an HTTP header.
    pub fn new(token: &str) -> Result<Self, TransportError> {
        let token = token.trim();
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(TransportError::Invalid(format!(
                "the auth token has {} characters; use at least {MIN_TOKEN_CHARS} (`strata keys` makes one)",
                token.chars().count()
            )));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TransportError::Invalid(
                "the auth token must be printable ASCII without spaces".into(),
            ));
        }
        Ok(Self(token.into()))
    }

    /// The first line of `path`.
    pub fn read(path: &Path) -> Result<Self, TransportError> {
        let text = std::fs::read_to_string(path).map_err(|e| TransportError::Read {
            what: "the auth token",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::new(text.lines().next().unwrap_or_default())
    }

    /// A fresh random token (256 bits, hex).
    pub fn generate() -> Result<Self, TransportError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| TransportError::Invalid(format!("no randomness for a token: {e}")))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(&hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        presented
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// Who a server admits.
#[derive(Debug, Clone)]
enum Admits {
    /// Anyone (loopback, or `--insecure`).
    Anyone,
    /// Holders of the cluster's token: cluster members.
    Members(AuthToken),
    /// Holders of a client API key.
    Clients(Arc<ApiKeys>),
}

/// The caller a server admitted, as request extensions carry it: the API key's name, `None` on
/// an open port or for a cluster member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller(pub Option<Arc<str>>);

impl Caller {
    /// The name for logs and metrics: the key's, or `-`.
    pub fn label(&self) -> &str {
        self.0.as_deref().unwrap_or("-")
    }
}

/// Server side: rejects calls whose `authorization` header is not `Bearer <credential>`.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    admits: Admits,
}

impl ServerAuth {
    /// Admits holders of `token`, or anyone without one.
    pub fn new(token: Option<AuthToken>) -> Self {
        Self {
            admits: token.map_or(Admits::Anyone, Admits::Members),
        }
    }

    /// Admits holders of one of `keys` (a coordinator's client ports), or anyone without them.
    pub fn clients(keys: Option<Arc<ApiKeys>>) -> Self {
        Self {
            admits: keys.map_or(Admits::Anyone, Admits::Clients),
        }
    }

    /// Whether every caller is admitted.
    pub fn is_open(&self) -> bool {
        matches!(self.admits, Admits::Anyone)
    }

    /// Checks an `authorization` header value (`Bearer <credential>`); the one rule for every
    /// port, gRPC and HTTP alike. The error is the message to show the caller.
    pub fn check(&self, header: Option<&[u8]>) -> Result<Caller, &'static str> {
        let presented = header.map(|h| {
            h.strip_prefix(b"Bearer ")
                .or_else(|| h.strip_prefix(b"bearer "))
                .unwrap_or(h)
        });
        match (&self.admits, presented) {
            (Admits::Anyone, _) => Ok(Caller::default()),
            (Admits::Members(_), None) => Err(
                "this server requires the cluster's auth token: send `authorization: Bearer <token>` \
                 (strata: --auth-token-file or --keys)",
            ),
            (Admits::Clients(_), None) => Err(
                "this server requires an API key: send `authorization: Bearer <key>` \
                 (strata: --api-key-file, STRATA_API_KEY or --keys)",
            ),
            (Admits::Members(token), Some(p)) if token.matches(p) => Ok(Caller::default()),
            (Admits::Members(_), Some(_)) => Err("wrong auth token"),
            (Admits::Clients(keys), Some(p)) => {
                keys.check(p).map(|name| Caller(Some(name))).ok_or("unknown API key")
            }
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|h| h.as_bytes());
        let caller = self.check(header).map_err(Status::unauthenticated)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Client side: adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientAuth {
    pub fn new(token: Option<AuthToken>) -> Self {
        // A token that passed `AuthToken::new` is printable ASCII, so the header always parses.
        let header = token.and_then(|t| format!("Bearer {}", t.as_str()).parse().ok());
        Self { header }
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut ServerAuth, header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(request).map(|_| ())
    }

    #[test]
    fn server_checks_the_bearer_token() {
        let token = AuthToken::new("0123456789abcdef0123").unwrap();
        let mut auth = ServerAuth::new(Some(token));
        assert!(call(&mut auth, Some("Bearer 0123456789abcdef0123")).is_ok());
        let missing = call(&mut auth, None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing
            .message()
            .contains("requires the cluster's auth token"));
        let wrong = call(&mut auth, Some("Bearer 0123456789abcdef0124")).unwrap_err();
        assert_eq!(wrong.message(), "wrong auth token");
        assert!(call(&mut auth, Some("Bearer 0123456789abcdef012")).is_err());
        assert!(call(&mut auth, Some("Bearer ")).is_err());
    }

    #[test]
    fn client_ports_admit_api_keys_by_name_and_never_the_cluster_token() {
        let key = AuthToken::new("client-key-0123456789").unwrap();
        let keys = Arc::new(ApiKeys::single("alice", key).unwrap());
        let auth = ServerAuth::clients(Some(keys));
        assert_eq!(
            auth.check(Some(b"Bearer client-key-0123456789")),
            Ok(Caller(Some("alice".into())))
        );
        assert_eq!(
            auth.check(Some(b"Bearer 0123456789abcdef0123")),
            Err("unknown API key")
        );
        assert!(auth
            .check(None)
            .unwrap_err()
            .contains("requires an API key"));
        let members = ServerAuth::new(Some(AuthToken::new("0123456789abcdef0123").unwrap()));
        assert_eq!(
            members.check(Some(b"Bearer client-key-0123456789")),
            Err("wrong auth token")
        );
        assert!(ServerAuth::clients(None).is_open());
    }

    #[test]
    fn without_a_token_every_call_passes() {
        assert!(call(&mut ServerAuth::new(None), None).is_ok());
    }

    #[test]
    fn client_attaches_what_the_server_expects() {
        let token = AuthToken::generate().unwrap();
        let mut client = ClientAuth::new(Some(token.clone()));
        let request = client.call(Request::new(())).unwrap();
        assert!(ServerAuth::new(Some(token)).call(request).is_ok());
    }

    #[test]
    fn short_or_odd_tokens_are_refused() {
        assert!(AuthToken::new("short").is_err());
        assert!(AuthToken::new("has a space in the middle!").is_err());
        assert!(AuthToken::new("  0123456789abcdef\n").is_ok());
        assert_eq!(AuthToken::generate().unwrap().as_str().len(), 64);
        assert_eq!(
            format!("{:?}", AuthToken::generate().unwrap()),
            "AuthToken(<redacted>)"
        );
    }
}
