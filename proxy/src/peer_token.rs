//! The replicas' shared peer token, kept in a Secret they create
//! themselves, so that an install needs no step to make one: the first
//! replica to start writes 32 random bytes (hex) under key `token`; every
//! other replica, and every later start, reads them. Two replicas racing to
//! create it both end up with the winner's token (the loser's create is
//! refused as a conflict and it reads).
//!
//! `SCALECAR_PEER_TOKEN`, when set, wins: users who manage the Secret
//! themselves (or rotate it) keep doing so.

use std::collections::BTreeMap;
use std::io::Read as _;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The key of the token in the Secret.
pub const KEY: &str = "token";

#[derive(Debug, thiserror::Error)]
pub enum TokenSecretError {
    #[error("reading Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating Secret {namespace}/{name}: {source}")]
    Create {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} has no non-empty UTF-8 key {KEY:?}")]
    NoToken { namespace: String, name: String },
    #[error("reading random bytes from /dev/urandom: {0}")]
    Random(#[source] std::io::Error),
}

/// The token in Secret `namespace/name`, created first if it does not
/// exist.
pub async fn shared_token(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<String, TokenSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let read = |source| TokenSecretError::Read {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(read)? {
        return token_of(&secret, namespace, name);
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "scalecar".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            KEY.to_string(),
            ByteString(random_hex()?.into_bytes()),
        )])),
        type_: Some("Opaque".to_string()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(%namespace, %name, "created the shared peer token Secret");
            token_of(&created, namespace, name)
        }
        // Another replica created it first: its token is the one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(name).await.map_err(read)?;
            token_of(&secret, namespace, name)
        }
        Err(source) => Err(TokenSecretError::Create {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

fn token_of(secret: &Secret, namespace: &str, name: &str) -> Result<String, TokenSecretError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenSecretError::NoToken {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
}

/// 32 bytes from the kernel's CSPRNG, as 64 hex digits.
fn random_hex() -> Result<String, TokenSecretError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(TokenSecretError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (random_hex().unwrap(), random_hex().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_secret_without_the_key_is_an_error_naming_it() {
        let s = Secret::default();
        let e = token_of(&s, "scalecar", "peer").unwrap_err().to_string();
        assert!(
            e.contains("scalecar/peer") && e.contains("\"token\""),
            "{e}"
        );
        let s = Secret {
            data: Some(BTreeMap::from([(
                KEY.into(),
                ByteString(b"abc\n".to_vec()),
            )])),
            ..Secret::default()
        };
        assert_eq!(token_of(&s, "n", "s").unwrap(), "abc");
    }
}
