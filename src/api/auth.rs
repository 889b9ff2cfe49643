//! Who may call what, as a tower layer in front of every service: bearer tokens with
//! roles (`generate`, `admin`), compared in constant time; the identity a call's jobs
//! belong to (the token's name, else the client certificate's subject); health and
//! reflection open to all. Refusals are gRPC statuses: UNAUTHENTICATED without a known
//! token, PERMISSION_DENIED without the role.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

use crate::api::caller::{bearer, same_secret, Caller};
use crate::config::{ConfigError, ServerSettings};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Generation, preprocessing, upscaling, cancelling, listing, capabilities.
    Generate,
    /// Also loading and unloading models.
    Admin,
}

/// A configured token.
#[derive(Clone)]
struct Token {
    name: String,
    role: Role,
    secret: String,
}

/// The access rules of a server.
#[derive(Clone)]
pub struct Access {
    tokens: Arc<Vec<Token>>,
    open_admin: bool,
}

impl Access {
    /// The tokens of `server.tokens` and `server.tokens_file`.
    pub fn from_settings(server: &ServerSettings) -> Result<Self, ConfigError> {
        let mut tokens = Vec::new();
        for (i, entry) in server.tokens.iter().enumerate() {
            tokens.push(parse_token(entry, &format!("server.tokens[{i}]"))?);
        }
        if !server.tokens_file.is_empty() {
            tokens.extend(read_tokens_file(Path::new(&server.tokens_file))?);
        }
        let mut names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError(format!(
                "`server.tokens`: the token name `{}` is given twice",
                pair[0]
            )));
        }
        Ok(Self {
            tokens: Arc::new(tokens),
            open_admin: server.allow_unauthenticated_admin,
        })
    }

    /// What is open to whom, for the start-up log.
    pub fn describe(&self) -> String {
        if self.tokens.is_empty() {
            let admin = if self.open_admin {
                "open to every client (server.allow_unauthenticated_admin)"
            } else {
                "refused (no tokens; set server.tokens or server.allow_unauthenticated_admin)"
            };
            return format!("no tokens: generation RPCs open to every client; admin RPCs {admin}; health and reflection open");
        }
        let admins = self.tokens.iter().filter(|t| t.role == Role::Admin).count();
        format!(
            "{} tokens ({admins} admin): every RPC but health and reflection needs one",
            self.tokens.len()
        )
    }

    /// Whether a call to `path` with `headers` may proceed, and as whom.
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Caller>, Status> {
        let Some(needed) = required_role(path) else {
            return Ok(None);
        };
        if self.tokens.is_empty() {
            return match needed {
                Role::Admin if !self.open_admin => Err(Status::permission_denied(
                    "the admin RPCs are closed: the server has no tokens and server.allow_unauthenticated_admin is false",
                )),
                _ => Ok(None),
            };
        }
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .and_then(|presented| self.matching(presented))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this RPC needs a known token (authorization: Bearer <token>)",
                )
            })?;
        if token.role < needed {
            return Err(Status::permission_denied(format!(
                "the token `{}` lacks the admin role this RPC needs",
                token.name
            )));
        }
        Ok(Some(Caller(format!("token:{}", token.name))))
    }

    /// The token whose secret is `presented`, comparing with every token so that the time
    /// taken says nothing about which (or whether one) matched.
    fn matching(&self, presented: &str) -> Option<&Token> {
        self.tokens.iter().fold(None, |found, token| {
            match same_secret(presented, &token.secret) {
                true => Some(token),
                false => found,
            }
        })
    }
}

/// The role a method needs (`None`: open to all).
fn required_role(path: &str) -> Option<Role> {
    match path {
        p if p.starts_with("/grpc.health.v1.") || p.starts_with("/grpc.reflection.") => None,
        "/sdxld.v1.ModelService/LoadModel" | "/sdxld.v1.ModelService/UnloadModel" => {
            Some(Role::Admin)
        }
        _ => Some(Role::Generate),
    }
}

/// One `name:role:secret` entry.
fn parse_token(entry: &str, key: &str) -> Result<Token, ConfigError> {
    let bad = |why: &str| ConfigError(format!("`{key}` {why}"));
    let mut parts = entry.trim().splitn(3, ':');
    let (name, role, secret) = match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(r), Some(s)) if !n.is_empty() && !s.is_empty() => (n, r, s),
        _ => return Err(bad("must be name:role:secret")),
    };
    let role = match role {
        "generate" => Role::Generate,
        "admin" => Role::Admin,
        other => {
            return Err(bad(&format!(
                "has role {other:?}; roles are generate and admin"
            )))
        }
    };
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(bad(
            "has a name with characters other than letters, digits and -_.@",
        ));
    }
    Ok(Token {
        name: name.to_string(),
        role,
        secret: secret.to_string(),
    })
}

/// The tokens of a file, one per line.
fn read_tokens_file(path: &Path) -> Result<Vec<Token>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "`server.tokens_file`: cannot read {}: {e}",
            path.display()
        ))
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|(i, line)| parse_token(line, &format!("server.tokens_file line {}", i + 1)))
        .collect()
}

/// The subject of a DER certificate, as `CN=…, O=…`.
fn subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

/// The client certificate's subject of a TLS call, if it sent one.
fn certificate_caller<B>(request: &http::Request<B>) -> Option<Caller> {
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let first = certs.first()?;
    subject(first.as_ref()).map(|s| Caller(format!("cert:{s}")))
}

/// The layer.
#[derive(Clone)]
pub struct AccessLayer {
    access: Access,
}

impl AccessLayer {
    pub fn new(access: Access) -> Self {
        Self { access }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            access: self.access.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    access: Access,
}

impl<S, B> Service<http::Request<B>> for AccessService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let checked = self
            .access
            .check(request.uri().path(), request.headers())
            .map(|token| token.or_else(|| certificate_caller(&request)));
        match checked {
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
            Ok(caller) => {
                let identity = caller.as_ref().map(|c| c.0.clone());
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                let future = self.inner.call(request);
                Box::pin(async move {
                    // Polled inside the RPC's span.
                    if let Some(identity) = identity {
                        tracing::Span::current().record("enduser.id", identity.as_str());
                    }
                    future.await
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_their_roles_and_bad_ones_name_the_key() {
        let token = parse_token("ops:admin:a:b:c", "k").expect("valid");
        assert_eq!((token.name.as_str(), token.role), ("ops", Role::Admin));
        assert_eq!(token.secret, "a:b:c");
        for bad in [
            "ops:admin",
            "ops:root:x",
            ":admin:x",
            "o ps:admin:x",
            "ops:admin:",
        ] {
            let err = parse_token(bad, "server.tokens[3]").err().expect(bad);
            assert!(err.0.contains("server.tokens[3]"), "{bad}: {}", err.0);
        }
    }

    #[test]
    fn health_and_reflection_are_open_and_loading_models_needs_admin() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            required_role("/sdxld.v1.ModelService/UnloadModel"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/sdxld.v1.ModelService/ListModels"),
            Some(Role::Generate)
        );
        assert_eq!(
            required_role("/sdxld.v1.GenerationService/Generate"),
            Some(Role::Generate)
        );
    }
}
