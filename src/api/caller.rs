//! Who a call comes from: the identity the access layer found (a token's name, a client
//! certificate's subject), else the bearer token it presents, else its peer's address.
//! Jobs belong to their caller: only the caller finds and cancels them.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Request;

/// The token of an `authorization: Bearer <token>` header (the scheme in any case, as
/// RFC 6750 allows).
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    bearer(metadata.get("authorization")?.to_str().ok()?)
}

/// The token of an `authorization` header's value `Bearer <token>`.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `presented` is `expected`, in time that does not depend on where they differ.
pub fn same_secret(presented: &str, expected: &str) -> bool {
    // Digests have one length whatever the secrets' lengths.
    let (a, b) = (Sha256::digest(presented), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

/// The identity a call's jobs belong to, set by the access layer when it knows one (a
/// configured token's name, a client certificate's subject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// The caller's identity: the access layer's (a configured token's name, a client
/// certificate's subject), else a digest of its bearer token when it presents one, else
/// its peer's IP address.
pub fn caller<T>(request: &Request<T>) -> String {
    if let Some(Caller(identity)) = request.extensions().get::<Caller>() {
        return identity.clone();
    }
    if let Some(token) = bearer_token(request.metadata()) {
        let digest = Sha256::digest(token.as_bytes());
        let short: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        return format!("token:{short}");
    }
    match request.remote_addr() {
        Some(addr) => format!("peer:{}", addr.ip()),
        None => "local".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer abc", "bearer abc", "BEARER  abc "] {
            let mut metadata = MetadataMap::new();
            metadata.insert("authorization", header.parse().expect("ascii"));
            assert_eq!(bearer_token(&metadata), Some("abc"), "{header}");
        }
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert_eq!(bearer_token(&metadata), None);
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3cre"));
        assert!(!same_secret("", "x"));
    }
}
