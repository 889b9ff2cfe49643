//! The server's TLS from `server.tls`: its certificate and key, and the client CA with
//! the client-certificate policy (mutual TLS), for tonic's rustls transport.

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsSettings;

/// The TLS configuration, or `None` for plaintext.
pub fn server_tls(tls: &TlsSettings) -> anyhow::Result<Option<ServerTlsConfig>> {
    if !tls.enabled() {
        return Ok(None);
    }
    let read = |key: &str, path: &str| {
        std::fs::read(path).with_context(|| format!("configuration: `{key}`: cannot read {path}"))
    };
    let cert = read("server.tls.cert", &tls.cert)?;
    let key = read("server.tls.key", &tls.key)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if tls.client_auth != "none" {
        let ca = read("server.tls.client_ca", &tls.client_ca)?;
        config = config
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(tls.client_auth == "optional");
    }
    Ok(Some(config))
}
