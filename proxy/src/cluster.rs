//! This replica in its cluster: who it is (the Lease holder and Event
//! reporter identity) and its Kubernetes client — the configured
//! kubeconfig or kube-rs's inference, every call carrying scalecar's
//! User-Agent — plus where the Lease lives and the peers' shared token.
//! Nothing here serves or decides.

use kube::runtime::events::Reporter;
use scalecar_config::KubernetesConfig;

use crate::server::StartError;

/// Who writes scalecar's Events: the pod's name where the Downward API
/// gives it (`POD_NAME`), else the host name.
pub(crate) fn reporter() -> Reporter {
    let instance = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty());
    Reporter {
        controller: "scalecar".into(),
        instance,
    }
}

/// This replica's identity as a Lease holder: its pod (or host) name, made
/// unique per process as client-go does, so a restarted pod with the same
/// name is a new holder.
pub fn identity() -> &'static str {
    static IDENTITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(|| {
        let name = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "scalecar".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("{name}_{}_{nanos:08x}", std::process::id())
    })
}

/// A client from the configured kubeconfig, or kube-rs's inference
/// (`KUBECONFIG`, `~/.kube/config`, the in-cluster service account).
pub async fn kube_client(k: &KubernetesConfig) -> Result<kube::Client, StartError> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                StartError::Kubeconfig {
                    path: path.clone(),
                    source: Box::new(source),
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|source| StartError::Kubeconfig {
                    path: path.clone(),
                    source: Box::new(source),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| StartError::KubeConfigInfer(Box::new(source)))?,
    };
    kube::Client::try_from(identified(config))
        .map_err(|source| StartError::KubeClient(Box::new(source)))
}

/// The peers' token from `leader-election.peer-token-secret` (created on
/// first start), when peers are on and `SCALECAR_PEER_TOKEN` is not set.
pub(crate) async fn shared_peer_token(
    client: &kube::Client,
    k: &KubernetesConfig,
) -> Result<Option<String>, StartError> {
    let Some(le) = &k.leader_election else {
        return Ok(None);
    };
    let from_env = std::env::var(crate::peers::TOKEN_ENV).is_ok_and(|t| !t.is_empty());
    let (Some(_), Some(name), false) = (&le.peer_selector, &le.peer_token_secret, from_env) else {
        return Ok(None);
    };
    let namespace = lease_namespace(le);
    Ok(Some(
        crate::peer_token::shared_token(client.clone(), &namespace, name).await?,
    ))
}

/// Where the Lease (and the peer token Secret) live: the configured
/// namespace, else the gateway's own (`POD_NAMESPACE`), else `default`.
pub fn lease_namespace(le: &scalecar_config::LeaderElectionConfig) -> String {
    le.namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "default".into())
}

/// scalecar's User-Agent on every call, `scalecar/VERSION (identity)`, so
/// audit logs (and kube-sim's request log) tell its calls — and each
/// replica's — apart.
pub fn identified(mut config: kube::Config) -> kube::Config {
    let agent = format!("scalecar/{} ({})", env!("CARGO_PKG_VERSION"), identity());
    let value = http::HeaderValue::from_str(&agent).unwrap_or_else(|_| {
        http::HeaderValue::from_static(concat!("scalecar/", env!("CARGO_PKG_VERSION")))
    });
    config.headers.push((http::header::USER_AGENT, value));
    config
}
