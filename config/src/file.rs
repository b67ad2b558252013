//! The config file of `scalecar run`, and bare policy files of `scalecar
//! replay`. YAML is read into a raw shape first (unknown fields rejected),
//! then every field is checked with its path in the messages, e.g.
//! `pools[1].endpoints[0]: "10.0.0.5" is not host:port`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::did_you_mean;
use crate::keys::validate_group;
use crate::policy::{Policy, Role};

/// A YAML scalar as users write it: `target: 10` or `target: "10"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Str(s) => s,
        }
    }
}

/// A config error: the field path and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}")]
    Yaml(String),
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Reads a bare policy (YAML map of keys without prefix) into strings.
pub fn policy_keys_from_yaml_str(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let raw: Option<BTreeMap<String, Scalar>> = serde_saphyr::from_str(text)
        .map_err(|e| ConfigError::Yaml(format!("not a YAML map of policy keys: {e}")))?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_string()))
        .collect())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    proxy: Option<RawProxy>,
    admin: Option<RawListen>,
    ext_proc: Option<RawListen>,
    limits: Option<RawLimits>,
    scaler: Option<RawScaler>,
    pools: Option<Vec<RawPool>>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKubernetes {
    kubeconfig: Option<String>,
    namespaces: Option<Vec<String>>,
    kinds: Option<Vec<RawKind>>,
    managed: Option<bool>,
    api_timeout: Option<Scalar>,
    leader_election: Option<RawLeaderElection>,
    endpoint_picker: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLeaderElection {
    enabled: Option<bool>,
    lease_name: Option<String>,
    namespace: Option<String>,
    lease_duration: Option<Scalar>,
    renew_deadline: Option<Scalar>,
    retry_period: Option<Scalar>,
    peer_selector: Option<String>,
    peer_timeout: Option<Scalar>,
    peer_token_secret: Option<String>,
    memory_config_map: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKind {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<String>,
    workers: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    max_header_bytes: Option<Scalar>,
    max_body_bytes: Option<Scalar>,
    header_timeout: Option<Scalar>,
    body_timeout: Option<Scalar>,
    request_timeout: Option<Scalar>,
    stream_idle_timeout: Option<Scalar>,
    connect_timeout: Option<Scalar>,
    queue_length: Option<Scalar>,
    queue_bytes: Option<Scalar>,
    queue_wait: Option<Scalar>,
    shutdown_grace: Option<Scalar>,
    shutdown_delay: Option<Scalar>,
    activation_timeout: Option<Scalar>,
    health_check_interval: Option<Scalar>,
    upstream_idle_timeout: Option<Scalar>,
    max_ejection_percent: Option<Scalar>,
    stream_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScaler {
    tick: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    /// A `Scalar` so that `model: true` or `model: 8` is refused rather
    /// than served as the model "true" or "8".
    model: Option<Scalar>,
    role: Option<String>,
    endpoints: Option<Vec<String>>,
    policy: Option<BTreeMap<String, Scalar>>,
}

/// Where the proxy listens, and how many threads serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Worker threads, each with its own connections; `None` is one per
    /// core.
    pub workers: Option<usize>,
}

/// Where the admin server (health, metrics, debug) listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// `ext-proc:` — serve Envoy's external processing protocol (gRPC
/// `envoy.service.ext_proc.v3.ExternalProcessor`) as the Gateway API
/// Inference Extension's endpoint picker, beside the proxy listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtProcConfig {
    pub listen: SocketAddr,
}

/// Bounds on what clients and upstreams may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub header_timeout: Duration,
    /// From the end of the headers to the end of the request body: a
    /// client that stops sending mid-body gets a 408, not a held task.
    pub body_timeout: Duration,
    /// Until the model server's response headers.
    pub request_timeout: Duration,
    /// No byte of a response body from the model server for this long
    /// ends it as a timeout (a server hung after its headers).
    pub stream_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Per pool.
    pub queue_length: usize,
    /// Request body bytes a pool's queued requests may hold at once; a
    /// request that would pass it is refused (429) like one that finds the
    /// queue full. What keeps a burst of long prompts inside the pod's
    /// memory limit (README: memory).
    pub queue_bytes: usize,
    pub queue_wait: Duration,
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long the proxy keeps accepting and serving while
    /// `/readyz` answers 503, before it stops accepting and drains: the
    /// time Service endpoints and load balancers take to stop sending new
    /// connections. HTTP/1 responses in this time say `Connection: close`,
    /// so kept-alive clients re-dial a pod that stays. 0 stops at once.
    pub shutdown_delay: Duration,
    pub activation_timeout: Duration,
    /// Active `GET /health` checks of static endpoints.
    pub health_check_interval: Duration,
    /// How long an idle keep-alive connection to a model server is reused.
    /// Below the 5 s after which uvicorn (vLLM, SGLang) closes idle
    /// connections, so the proxy drops them first.
    pub upstream_idle_timeout: Duration,
    /// Passive ejection never takes out more than this share of a pool's
    /// endpoints, nor its last one (percent, as Envoy's outlier detection).
    pub max_ejection_percent: u32,
    /// Ask model servers for the usage chunk of every stream (adding
    /// `stream_options.include_usage` where the client set no
    /// `stream_options`) and cut it from streams whose client did not ask:
    /// exact token counts and the prompt calibration from every stream.
    pub stream_usage: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 << 10,
            max_body_bytes: 16 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(2),
            queue_length: 1024,
            queue_bytes: 32 << 20,
            queue_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::from_secs(5),
            activation_timeout: Duration::from_secs(120),
            health_check_interval: Duration::from_secs(5),
            upstream_idle_timeout: Duration::from_secs(4),
            max_ejection_percent: 50,
            stream_usage: true,
        }
    }
}

/// The control loop's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalerConfig {
    pub tick: Duration,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            tick: Duration::from_secs(2),
        }
    }
}

/// One pool: a model in a role, its endpoints and its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub model: String,
    pub role: Role,
    /// `host:port` strings, validated; resolved by the proxy.
    pub endpoints: Vec<String>,
    pub policy: Policy,
}

/// A kind of workload to watch besides Deployments and StatefulSets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KindConfig {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
}

/// Kubernetes discovery and scaling (`kubernetes:`; `kubernetes: {}` turns
/// it on with these defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster service account, in kube-rs's order.
    pub kubeconfig: Option<String>,
    /// Namespaces watched; empty: all.
    pub namespaces: Vec<String>,
    /// Watched besides Deployments and StatefulSets.
    pub kinds: Vec<KindConfig>,
    /// `false`: decisions are exported and evented, nothing is patched.
    pub managed: bool,
    /// Bound on each call to the API server from the control loop.
    pub api_timeout: Duration,
    /// One decider among several gateway replicas. On whenever scalecar
    /// patches (`managed`), so two replicas never both write; off with
    /// `leader-election: {enabled: false}` or when advisory.
    pub leader_election: Option<LeaderElectionConfig>,
    /// The Service name that `InferencePool`s put in
    /// `spec.endpointPickerRef` to be served by this scalecar (its
    /// `ext-proc` listener); `None`: InferencePools are not watched.
    pub endpoint_picker: Option<String>,
}

/// The leader Lease (client-go's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElectionConfig {
    pub lease_name: String,
    /// `None`: the gateway's own namespace (`POD_NAMESPACE`), else `default`.
    pub namespace: Option<String>,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// The label selector of the gateway's own pods (in the Lease's
    /// namespace): the leader reads their windows (`/internal/snapshot` on
    /// their container port named `admin`) and decides on the sum. `None`:
    /// the leader decides on its own traffic.
    pub peer_selector: Option<String>,
    /// A peer that has not answered within this is left out (the decision
    /// is partial: it may scale up, never down).
    pub peer_timeout: Duration,
    /// When `SCALECAR_PEER_TOKEN` is not set: the Secret (in the Lease's
    /// namespace, key `token`) the replicas share it through. The first
    /// replica to start creates it with a random token; the rest read it.
    pub peer_token_secret: Option<String>,
    /// The ConfigMap (in the Lease's namespace) the leader keeps its
    /// algorithms' memory in, every 30 s and when it stops, for the next
    /// leader to start from. `None` (`memory-config-map: ""`): each new
    /// leader starts afresh.
    pub memory_config_map: Option<String>,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            lease_name: "scalecar".into(),
            namespace: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            peer_selector: None,
            peer_timeout: Duration::from_millis(500),
            peer_token_secret: None,
            memory_config_map: Some("scalecar-memory".into()),
        }
    }
}

/// The programmatic default: no leader election (one writer by construction,
/// as tests and the demo build it). A config file's `kubernetes:` section
/// turns it on whenever `managed` (see `leader_election`).
impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            namespaces: Vec::new(),
            kinds: Vec::new(),
            managed: true,
            api_timeout: Duration::from_secs(10),
            leader_election: None,
            endpoint_picker: None,
        }
    }
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalecarConfig {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    /// The endpoint picker's gRPC listener, when set.
    pub ext_proc: Option<ExtProcConfig>,
    pub limits: Limits,
    pub scaler: ScalerConfig,
    /// Static pools (may be empty when Kubernetes discovery is on).
    pub pools: Vec<PoolConfig>,
    pub kubernetes: Option<KubernetesConfig>,
}

/// A DNS-1123 label, as namespace names are.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain, as Secret names are: dot-separated labels.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// More threads than this serve no machine better.
const MAX_WORKERS: usize = 1024;

struct Checker {
    errors: Vec<String>,
}

impl Checker {
    fn fail(&mut self, path: &str, message: impl std::fmt::Display) {
        self.errors.push(format!("{path}: {message}"));
    }

    fn addr(&mut self, path: &str, v: Option<String>, default: &str) -> SocketAddr {
        let text = v.unwrap_or_else(|| default.to_string());
        text.parse().unwrap_or_else(|_| {
            self.fail(
                path,
                format!("{text:?} is not an address like 0.0.0.0:8080"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    fn size(&mut self, path: &str, v: Option<Scalar>, default: usize, min: usize) -> usize {
        let Some(v) = v else { return default };
        let text = v.into_string();
        match text.parse::<usize>() {
            Ok(n) if n >= min => n,
            _ => {
                self.fail(path, format!("{text:?} is not a whole number ≥ {min}"));
                default
            }
        }
    }

    /// As [`Self::duration`], 0 allowed (a step that may be skipped).
    fn duration_or_zero(&mut self, path: &str, v: Option<Scalar>, default: Duration) -> Duration {
        match v {
            Some(v)
                if humantime::parse_duration(&v.clone().into_string())
                    .is_ok_and(|d| d.is_zero()) =>
            {
                Duration::ZERO
            }
            v => self.duration(path, v, default),
        }
    }

    fn duration(&mut self, path: &str, v: Option<Scalar>, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        let text = v.into_string();
        match humantime::parse_duration(&text) {
            Ok(d) if d > MAX_DURATION => {
                self.fail(
                    path,
                    format!("{text:?} is more than 24h, the longest any duration here may be"),
                );
                default
            }
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.fail(path, format!("{text:?} must be greater than 0"));
                default
            }
            Err(_) => {
                self.fail(
                    path,
                    format!("{text:?} is not a duration (like 500ms, 30s, 2m)"),
                );
                default
            }
        }
    }
}

/// The longest duration any config key takes. Timeouts are added to
/// instants on every connection and request: an unbounded one overflowed
/// there (a panic per connection) after passing validation.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn valid_endpoint(e: &str) -> bool {
    let Some((host, port)) = e.rsplit_once(':') else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p > 0)
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b))
}

impl ScalecarConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<ScalecarConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_yaml_str(&text).map_err(|e| match e {
            ConfigError::Yaml(m) => ConfigError::Yaml(format!("{}: {m}", path.display())),
            ConfigError::Invalid(list) => ConfigError::Invalid(
                list.into_iter()
                    .map(|m| format!("{}: {m}", path.display()))
                    .collect(),
            ),
            other => other,
        })
    }

    /// Parses and validates a config file's text.
    pub fn from_yaml_str(text: &str) -> Result<ScalecarConfig, ConfigError> {
        let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| {
            let message = e.to_string();
            // serde names the unknown field; add a suggestion.
            let hint = message
                .split('`')
                .nth(1)
                .and_then(|field| {
                    did_you_mean(
                        field,
                        [
                            "proxy",
                            "admin",
                            "limits",
                            "scaler",
                            "pools",
                            "listen",
                            "workers",
                            "max-header-bytes",
                            "max-body-bytes",
                            "header-timeout",
                            "body-timeout",
                            "request-timeout",
                            "stream-idle-timeout",
                            "connect-timeout",
                            "queue-length",
                            "queue-bytes",
                            "queue-wait",
                            "shutdown-grace",
                            "shutdown-delay",
                            "activation-timeout",
                            "health-check-interval",
                            "upstream-idle-timeout",
                            "max-ejection-percent",
                            "stream-usage",
                            "tick",
                            "model",
                            "role",
                            "endpoints",
                            "policy",
                            "kubernetes",
                            "kubeconfig",
                            "namespaces",
                            "kinds",
                            "managed",
                            "api-timeout",
                            "leader-election",
                            "enabled",
                            "lease-name",
                            "lease-duration",
                            "renew-deadline",
                            "retry-period",
                            "peer-selector",
                            "peer-timeout",
                            "peer-token-secret",
                            "memory-config-map",
                            "endpoint-picker",
                            "group",
                            "version",
                            "kind",
                        ],
                    )
                })
                .filter(|_| message.contains("unknown field"))
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            ConfigError::Yaml(format!("{message}{hint}"))
        })?;
        let mut c = Checker { errors: Vec::new() };
        let (listen, workers) = raw.proxy.map(|p| (p.listen, p.workers)).unwrap_or_default();
        let proxy = ProxyConfig {
            listen: c.addr("proxy.listen", listen, "0.0.0.0:8080"),
            workers: workers.map(|w| {
                let n = c.size("proxy.workers", Some(w), 1, 1);
                if n > MAX_WORKERS {
                    c.fail("proxy.workers", format!("{n} is more than {MAX_WORKERS}"));
                }
                n
            }),
        };
        let admin = AdminConfig {
            listen: c.addr(
                "admin.listen",
                raw.admin.and_then(|p| p.listen),
                "0.0.0.0:9090",
            ),
        };
        let ext_proc = raw.ext_proc.map(|e| ExtProcConfig {
            listen: c.addr("ext-proc.listen", e.listen, "0.0.0.0:9002"),
        });
        let l = raw.limits.unwrap_or_default();
        let d = Limits::default();
        let limits = Limits {
            max_header_bytes: c.size(
                "limits.max-header-bytes",
                l.max_header_bytes,
                d.max_header_bytes,
                1024,
            ),
            max_body_bytes: c.size(
                "limits.max-body-bytes",
                l.max_body_bytes,
                d.max_body_bytes,
                1024,
            ),
            header_timeout: c.duration("limits.header-timeout", l.header_timeout, d.header_timeout),
            body_timeout: c.duration("limits.body-timeout", l.body_timeout, d.body_timeout),
            request_timeout: c.duration(
                "limits.request-timeout",
                l.request_timeout,
                d.request_timeout,
            ),
            stream_idle_timeout: c.duration(
                "limits.stream-idle-timeout",
                l.stream_idle_timeout,
                d.stream_idle_timeout,
            ),
            connect_timeout: c.duration(
                "limits.connect-timeout",
                l.connect_timeout,
                d.connect_timeout,
            ),
            queue_length: c.size("limits.queue-length", l.queue_length, d.queue_length, 0),
            queue_bytes: c.size("limits.queue-bytes", l.queue_bytes, d.queue_bytes, 1024),
            queue_wait: c.duration("limits.queue-wait", l.queue_wait, d.queue_wait),
            shutdown_grace: c.duration("limits.shutdown-grace", l.shutdown_grace, d.shutdown_grace),
            shutdown_delay: c.duration_or_zero(
                "limits.shutdown-delay",
                l.shutdown_delay,
                d.shutdown_delay,
            ),
            activation_timeout: c.duration(
                "limits.activation-timeout",
                l.activation_timeout,
                d.activation_timeout,
            ),
            health_check_interval: c.duration(
                "limits.health-check-interval",
                l.health_check_interval,
                d.health_check_interval,
            ),
            upstream_idle_timeout: c.duration(
                "limits.upstream-idle-timeout",
                l.upstream_idle_timeout,
                d.upstream_idle_timeout,
            ),
            max_ejection_percent: {
                let n = c.size(
                    "limits.max-ejection-percent",
                    l.max_ejection_percent,
                    d.max_ejection_percent as usize,
                    0,
                );
                if n > 100 {
                    c.fail(
                        "limits.max-ejection-percent",
                        format!("{n} is more than 100"),
                    );
                }
                n.min(100) as u32
            },
            stream_usage: l.stream_usage.unwrap_or(d.stream_usage),
        };
        let scaler = ScalerConfig {
            tick: c.duration(
                "scaler.tick",
                raw.scaler.and_then(|s| s.tick),
                Duration::from_secs(2),
            ),
        };
        let kubernetes = raw.kubernetes.map(|k| {
            let d = KubernetesConfig::default();
            let namespaces = k.namespaces.unwrap_or_default();
            for (i, ns) in namespaces.iter().enumerate() {
                if !dns_label(ns) {
                    c.fail(
                        &format!("kubernetes.namespaces[{i}]"),
                        format!("{ns:?} is not a namespace name (lowercase letters, digits, '-')"),
                    );
                }
            }
            let mut kinds = Vec::new();
            for (i, raw) in k.kinds.unwrap_or_default().into_iter().enumerate() {
                let path = format!("kubernetes.kinds[{i}]");
                let group = raw.group.unwrap_or_default().trim().to_string();
                let version = raw.version.unwrap_or_default().trim().to_string();
                let kind = raw.kind.unwrap_or_default().trim().to_string();
                if version.is_empty() {
                    c.fail(&format!("{path}.version"), "is required (like v1)");
                }
                if !kind.starts_with(|ch: char| ch.is_ascii_uppercase())
                    || !kind.chars().all(|ch| ch.is_ascii_alphanumeric())
                {
                    c.fail(
                        &format!("{path}.kind"),
                        format!("{kind:?} is not a kind (like ModelServer)"),
                    );
                }
                if !group
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                {
                    c.fail(
                        &format!("{path}.group"),
                        format!("{group:?} is not an API group"),
                    );
                }
                kinds.push(KindConfig {
                    group,
                    version,
                    kind,
                });
            }
            let managed = k.managed.unwrap_or(d.managed);
            // Whoever patches elects: absent, the section is the defaults.
            let election = match k.leader_election {
                Some(l) if l.enabled == Some(false) => None,
                Some(l) => Some(l),
                None if managed => Some(RawLeaderElection::default()),
                None => None,
            };
            let endpoint_picker = k.endpoint_picker.map(|n| n.trim().to_string());
            if let Some(name) = &endpoint_picker
                && !dns_label(name)
            {
                c.fail(
                    "kubernetes.endpoint-picker",
                    format!("{name:?} is not a Service name (lowercase letters, digits, '-')"),
                );
            }
            KubernetesConfig {
                endpoint_picker,
                kubeconfig: k.kubeconfig.filter(|p| !p.trim().is_empty()),
                namespaces,
                kinds,
                managed,
                api_timeout: c.duration("kubernetes.api-timeout", k.api_timeout, d.api_timeout),
                leader_election: election.map(|l| {
                    let d = LeaderElectionConfig::default();
                    let p = "kubernetes.leader-election";
                    let lease_name = l.lease_name.unwrap_or(d.lease_name);
                    if !lease_name.split('.').all(dns_label) {
                        c.fail(
                            &format!("{p}.lease-name"),
                            format!("{lease_name:?} is not an object name"),
                        );
                    }
                    if let Some(ns) = &l.namespace
                        && !dns_label(ns)
                    {
                        c.fail(
                            &format!("{p}.namespace"),
                            format!("{ns:?} is not a namespace name"),
                        );
                    }
                    let e = LeaderElectionConfig {
                        lease_name,
                        namespace: l.namespace,
                        lease_duration: c.duration(
                            &format!("{p}.lease-duration"),
                            l.lease_duration,
                            d.lease_duration,
                        ),
                        renew_deadline: c.duration(
                            &format!("{p}.renew-deadline"),
                            l.renew_deadline,
                            d.renew_deadline,
                        ),
                        retry_period: c.duration(
                            &format!("{p}.retry-period"),
                            l.retry_period,
                            d.retry_period,
                        ),
                        peer_selector: l.peer_selector.filter(|s| !s.trim().is_empty()),
                        peer_timeout: c.duration(
                            &format!("{p}.peer-timeout"),
                            l.peer_timeout,
                            d.peer_timeout,
                        ),
                        peer_token_secret: l.peer_token_secret.filter(|s| !s.trim().is_empty()),
                        memory_config_map: match l.memory_config_map {
                            Some(name) => Some(name.trim().to_string()).filter(|n| !n.is_empty()),
                            None => d.memory_config_map,
                        },
                    };
                    if let Some(name) = &e.memory_config_map
                        && !dns_subdomain(name)
                    {
                        c.fail(
                            &format!("{p}.memory-config-map"),
                            format!("{name:?} is not a ConfigMap name (lowercase letters, digits, '-' and '.', at most 253)"),
                        );
                    }
                    if let Some(name) = &e.peer_token_secret
                        && !dns_subdomain(name)
                    {
                        c.fail(
                            &format!("{p}.peer-token-secret"),
                            format!("{name:?} is not a Secret name (lowercase letters, digits, '-' and '.', at most 253)"),
                        );
                    }
                    // client-go's rules: a leader must step down before
                    // anyone may take over, and renew more than once.
                    if e.renew_deadline >= e.lease_duration {
                        c.fail(
                            p,
                            format!(
                                "renew-deadline {:?} must be shorter than lease-duration {:?}",
                                e.renew_deadline, e.lease_duration
                            ),
                        );
                    }
                    if e.retry_period >= e.renew_deadline {
                        c.fail(
                            p,
                            format!(
                                "retry-period {:?} must be shorter than renew-deadline {:?}",
                                e.retry_period, e.renew_deadline
                            ),
                        );
                    }
                    e
                }),
            }
        });
        let raw_pools = raw.pools.unwrap_or_default();
        if raw_pools.is_empty() && kubernetes.is_none() {
            c.fail(
                "pools",
                "at least one pool is needed (model, role, endpoints), or kubernetes: {} to discover them",
            );
        }
        let mut pools = Vec::new();
        for (i, p) in raw_pools.into_iter().enumerate() {
            let path = format!("pools[{i}]");
            let model = match p.model {
                Some(Scalar::Str(m)) if !m.trim().is_empty() => m.trim().to_string(),
                Some(other @ (Scalar::Bool(_) | Scalar::Int(_) | Scalar::Float(_))) => {
                    let value = other.into_string();
                    c.fail(
                        &format!("{path}.model"),
                        format!(
                            "{value} is not a string: a model name is text (quote it: \"{value}\")"
                        ),
                    );
                    continue;
                }
                _ => {
                    c.fail(
                        &format!("{path}.model"),
                        "is required (the served model name)",
                    );
                    continue;
                }
            };
            let role = match p.role.as_deref() {
                None => Role::Unified,
                Some(r) => match Role::ALL.into_iter().find(|x| x.as_str() == r) {
                    Some(role) => role,
                    None => {
                        c.fail(
                            &format!("{path}.role"),
                            format!("{r:?} must be unified, prefill or decode"),
                        );
                        continue;
                    }
                },
            };
            let endpoints = p.endpoints.unwrap_or_default();
            if endpoints.is_empty() {
                // Its requests could only wait out the activation timeout:
                // nothing would ever add an endpoint to a static pool.
                c.fail(
                    &format!("{path}.endpoints"),
                    "at least one endpoint (host:port) is needed; a pool that may be at zero replicas comes from an annotated workload (kubernetes:)",
                );
            }
            for (j, e) in endpoints.iter().enumerate() {
                if !valid_endpoint(e) {
                    c.fail(
                        &format!("{path}.endpoints[{j}]"),
                        format!("{e:?} is not host:port"),
                    );
                }
            }
            let keys: BTreeMap<String, String> = p
                .policy
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_string()))
                .collect();
            let policy = match Policy::from_pool_keys(&keys, role) {
                Ok(p) => p,
                Err(errors) => {
                    for e in errors.iter() {
                        c.fail(&format!("{path}.policy"), &e.message);
                    }
                    continue;
                }
            };
            pools.push(PoolConfig {
                model,
                role,
                endpoints,
                policy,
            });
        }
        // Across pools.
        let mut seen = BTreeMap::new();
        for (i, p) in pools.iter().enumerate() {
            if let Some(first) = seen.insert((p.model.clone(), p.role), i) {
                c.fail(
                    &format!("pools[{i}]"),
                    format!(
                        "model {} role {} is already pools[{first}]",
                        p.model, p.role
                    ),
                );
            }
        }
        let mut models: BTreeMap<&str, Vec<Role>> = BTreeMap::new();
        for p in &pools {
            models.entry(p.model.as_str()).or_default().push(p.role);
        }
        for (model, roles) in &models {
            let has = |r| roles.contains(&r);
            if has(Role::Unified) && (has(Role::Prefill) || has(Role::Decode)) {
                c.fail(
                    "pools",
                    format!("model {model} is both unified and disaggregated"),
                );
            } else if has(Role::Prefill) != has(Role::Decode) {
                let missing = if has(Role::Prefill) {
                    "decode"
                } else {
                    "prefill"
                };
                c.fail(
                    "pools",
                    format!(
                        "model {model} has no {missing} pool (a disaggregated model needs both)"
                    ),
                );
            }
        }
        let mut groups: BTreeMap<&str, Vec<(Role, &Policy)>> = BTreeMap::new();
        for p in &pools {
            if let Some(g) = &p.policy.group {
                groups
                    .entry(g.as_str())
                    .or_default()
                    .push((p.role, &p.policy));
            }
        }
        for (g, members) in &groups {
            if let Err(e) = validate_group(g, members) {
                c.fail("pools", e.message);
            }
        }
        if !c.errors.is_empty() {
            return Err(ConfigError::Invalid(c.errors));
        }
        Ok(ScalecarConfig {
            proxy,
            admin,
            ext_proc,
            limits,
            scaler,
            pools,
            kubernetes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A file setting `key` (a row of docs/configuration.md) to `value`, or
    /// the same file without it. Discovery is on so no pool is required.
    fn file_with(key: &str, value: Option<&str>) -> String {
        let item = |base: &[(&str, &str)], field: &str| {
            let mut fields: BTreeMap<&str, &str> = base.iter().copied().collect();
            if let Some(v) = value {
                fields.insert(field, v);
            }
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("[{{{}}}]", inner.join(", "))
        };
        if let Some(field) = key.strip_prefix("pools[].") {
            let pool = item(&[("model", "m"), ("endpoints", "[\"h:1\"]")], field);
            return format!("{{pools: {pool}, kubernetes: {{}}}}");
        }
        if let Some(field) = key.strip_prefix("kubernetes.kinds[].") {
            let kind = item(&[("version", "v1"), ("kind", "Model")], field);
            return format!("{{kubernetes: {{kinds: {kind}}}}}");
        }
        let Some(value) = value else {
            return "{kubernetes: {}}".into();
        };
        let nested = key
            .rsplit('.')
            .fold(value.to_string(), |inner, k| format!("{{{k}: {inner}}}"));
        if key.starts_with("kubernetes") {
            nested
        } else {
            format!("{{{}, kubernetes: {{}}}}", &nested[1..nested.len() - 1])
        }
    }

    /// The fields serde knows at `probe`'s `zz-unknown`.
    fn known_fields(probe: &str) -> Vec<String> {
        let e = ScalecarConfig::from_yaml_str(probe)
            .unwrap_err()
            .to_string();
        let first = e.lines().next().unwrap_or_default();
        let (_, expected) = first
            .split_once("expected")
            .unwrap_or_else(|| panic!("{probe}: {e}"));
        expected
            .split(" (")
            .next()
            .unwrap_or_default()
            .trim_start_matches(" one of")
            .split(',')
            .map(|f| f.trim().trim_matches('`').to_string())
            .collect()
    }

    /// docs/configuration.md is the reference users read: its keys are the
    /// parser's, its literal defaults the parser's defaults, and its
    /// examples behave as it says.
    #[test]
    fn the_config_reference_matches_the_parser() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let text = std::fs::read_to_string(path).unwrap();
        let rows: Vec<Vec<String>> = text
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                l.split(" | ")
                    .map(|c| c.trim_matches(['|', ' ']).to_string())
                    .collect()
            })
            .collect();
        let literal = |c: &str| {
            (c.starts_with('`') && c.ends_with('`') && c.matches('`').count() == 2)
                .then(|| c[1..c.len() - 1].to_string())
        };
        let documented: BTreeSet<String> = rows.iter().filter_map(|r| literal(&r[0])).collect();
        let mut known = BTreeSet::new();
        for (prefix, probe) in [
            ("", "{zz-unknown: 1}"),
            ("proxy.", "{proxy: {zz-unknown: 1}}"),
            ("admin.", "{admin: {zz-unknown: 1}}"),
            ("ext-proc.", "{ext-proc: {zz-unknown: 1}}"),
            ("limits.", "{limits: {zz-unknown: 1}}"),
            ("scaler.", "{scaler: {zz-unknown: 1}}"),
            ("kubernetes.", "{kubernetes: {zz-unknown: 1}}"),
            (
                "kubernetes.leader-election.",
                "{kubernetes: {leader-election: {zz-unknown: 1}}}",
            ),
            (
                "kubernetes.kinds[].",
                "{kubernetes: {kinds: [{zz-unknown: 1}]}}",
            ),
            ("pools[].", "{pools: [{zz-unknown: 1}]}"),
        ] {
            for f in known_fields(probe) {
                known.insert(format!("{prefix}{f}"));
            }
        }
        // A section documented only through its keys is not a row.
        let sections: BTreeSet<String> = known
            .iter()
            .filter(|k| !documented.contains(*k))
            .filter(|k| documented.iter().any(|d| d.starts_with(&format!("{k}."))))
            .cloned()
            .collect();
        let rows_known: BTreeSet<String> = known.difference(&sections).cloned().collect();
        assert_eq!(documented, rows_known, "docs/configuration.md keys");
        assert!(documented.len() > 40, "{} rows", documented.len());

        let base = |key: &str| ScalecarConfig::from_yaml_str(&file_with(key, None)).unwrap();
        for r in &rows {
            let Some(key) = literal(&r[0]) else { continue };
            let (default, accepted, refused) = (&r[2], &r[3], &r[4]);
            if let Some(d) = literal(default) {
                let with = ScalecarConfig::from_yaml_str(&file_with(&key, Some(&d)))
                    .unwrap_or_else(|e| panic!("{key}: default {d}: {e}"));
                assert_eq!(with, base(&key), "{key}: {d} is not the default");
            }
            let a = literal(accepted).unwrap_or_else(|| panic!("{key}: no accepted example"));
            let file = file_with(&key, Some(&a));
            let with = ScalecarConfig::from_yaml_str(&file)
                .unwrap_or_else(|e| panic!("{key}: {a} is documented as accepted: {e}"));
            if literal(default).is_some_and(|d| d != a) {
                assert_ne!(with, base(&key), "{key}: {a} changed nothing");
            }
            let Some(bad) = literal(refused) else {
                assert_eq!(refused, "—", "{key}: the refused cell");
                continue;
            };
            let e = match ScalecarConfig::from_yaml_str(&file_with(&key, Some(&bad))) {
                Ok(_) => panic!("{key}: {bad} is documented as refused"),
                Err(e) => e.to_string(),
            };
            let leaf = key.rsplit('.').next().unwrap().trim_end_matches("[]");
            assert!(
                e.contains(leaf),
                "{key} = {bad}: the error names another key: {e}"
            );
        }
    }

    const GOOD: &str = r#"
proxy: { listen: "127.0.0.1:8080", workers: 3 }
admin: { listen: "127.0.0.1:9090" }
limits:
  max-body-bytes: 1048576
  queue-wait: 5s
  upstream-idle-timeout: 2s
  max-ejection-percent: 34
scaler: { tick: 1s }
pools:
  - model: llama-3-8b
    role: unified
    endpoints: ["10.0.0.5:8000", "model-0.svc:8000"]
    policy: { max-concurrency: "64", target: 10, min-replicas: 0 }
  - model: qwen
    role: prefill
    endpoints: ["127.0.0.1:8001"]
    policy: { group: qwen-pd, preferred-share: 20-50 }
  - model: qwen
    role: decode
    endpoints: ["127.0.0.1:8002"]
    policy: { group: qwen-pd, preferred-share: "40-80" }
"#;

    #[test]
    fn a_good_file() {
        let c = ScalecarConfig::from_yaml_str(GOOD).unwrap();
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.proxy.workers, Some(3));
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        assert_eq!(c.limits.queue_wait, Duration::from_secs(5));
        assert_eq!(c.limits.queue_length, 1024);
        assert_eq!(c.limits.queue_bytes, 32 << 20);
        assert_eq!(c.limits.upstream_idle_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.max_ejection_percent, 34);
        assert_eq!(c.scaler.tick, Duration::from_secs(1));
        assert_eq!(c.pools.len(), 3);
        assert_eq!(c.pools[0].policy.max_concurrency, Some(64));
        assert_eq!(c.pools[0].policy.target, 10.0);
        assert_eq!(c.pools[0].policy.min_replicas, 0);
        assert_eq!(c.pools[2].role, Role::Decode);
    }

    fn errors(text: &str) -> String {
        ScalecarConfig::from_yaml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn a_quoted_model_name_is_text_whatever_it_looks_like() {
        let c = ScalecarConfig::from_yaml_str(
            "pools: [{model: \"true\", endpoints: [\"1.2.3.4:80\"]}, {model: '8', endpoints: [\"1.2.3.4:81\"]}]",
        )
        .unwrap();
        let names: Vec<&str> = c.pools.iter().map(|p| p.model.as_str()).collect();
        assert_eq!(names, ["true", "8"]);
    }

    #[test]
    fn errors_carry_the_field_path() {
        let pool = "pools: [{model: m, endpoints: [\"1.2.3.4:80\"]}]";
        for (text, want) in [
            (format!("proxy: {{listen: nowhere}}\n{pool}"), "proxy.listen: \"nowhere\" is not an address"),
            (format!("proxy: {{workers: 0}}\n{pool}"), "proxy.workers: \"0\" is not a whole number ≥ 1"),
            (format!("proxy: {{workers: 5000}}\n{pool}"), "proxy.workers: 5000 is more than 1024"),
            (format!("limits: {{queue-wait: 3x}}\n{pool}"), "limits.queue-wait: \"3x\" is not a duration"),
            (format!("limits: {{queue-length: -1}}\n{pool}"), "limits.queue-length: \"-1\" is not a whole number"),
            (format!("limits: {{max-ejection-percent: 101}}\n{pool}"), "limits.max-ejection-percent: 101 is more than 100"),
            (format!("limits: {{upstream-idle-timeout: 0s}}\n{pool}"), "limits.upstream-idle-timeout: \"0s\" must be greater than 0"),
            (format!("limits: {{header-timeout: 18446744073709551615s}}\n{pool}"), "limits.header-timeout: \"18446744073709551615s\" is more than 24h, the longest any duration here may be"),
            (format!("limits: {{request-timeout: 25h}}\n{pool}"), "limits.request-timeout: \"25h\" is more than 24h"),
            ("pools: [{model: m, endpoints: [\"10.0.0.5\"]}]".into(), "pools[0].endpoints[0]: \"10.0.0.5\" is not host:port"),
            ("pools: [{model: m, policy: {min-replicas: 5, max-replicas: 3}}]".into(), "pools[0].policy: min-replicas 5 is greater than max-replicas 3"),
            ("pools: [{model: m, role: both}]".into(), "pools[0].role: \"both\" must be unified"),
            ("pools: [{role: decode}]".into(), "pools[0].model: is required"),
            ("pools: [{model: m}]".into(), "pools[0].endpoints: at least one endpoint (host:port) is needed"),
            ("pools: [{model: m, endpoints: []}]".into(), "pools[0].endpoints: at least one endpoint"),
            ("pools: [{model: true}]".into(), "pools[0].model: true is not a string: a model name is text (quote it: \"true\")"),
            ("pools: [{model: 8}]".into(), "pools[0].model: 8 is not a string"),
            ("pools: []".into(), "pools: at least one pool"),
            ("pools: [{model: m}, {model: m}]".into(), "pools[1]: model m role unified is already pools[0]"),
            ("pools: [{model: m, role: prefill}]".into(), "model m has no decode pool"),
            ("pools: [{model: m}, {model: m, role: decode}]".into(), "model m is both unified and disaggregated"),
            ("pools: [{model: m, policy: {model: x}}]".into(), "pools[0].policy: model is not a policy key here"),
            (
                "pools: [{model: m, role: prefill, policy: {group: g, preferred-share: 70-90}}, {model: m, role: decode, policy: {group: g, preferred-share: 40-60}}]".into(),
                "add up to 110 %",
            ),
        ] {
            let err = errors(&text);
            assert!(err.contains(want), "{text}\n→ {err}");
        }
    }

    #[test]
    fn kubernetes_alone_is_a_config_and_its_fields_are_checked() {
        let c = ScalecarConfig::from_yaml_str("kubernetes: {}").unwrap();
        assert!(c.pools.is_empty());
        assert_eq!(
            c.kubernetes,
            Some(KubernetesConfig {
                leader_election: Some(LeaderElectionConfig::default()),
                ..KubernetesConfig::default()
            })
        );
        assert!(c.kubernetes.as_ref().is_some_and(|k| k.managed));
        let c = ScalecarConfig::from_yaml_str(
            "kubernetes:\n  kubeconfig: /tmp/kc\n  namespaces: [llm, batch]\n  managed: false\n  api-timeout: 3s\n  kinds: [{group: serving.example.com, version: v1, kind: ModelServer}]\n  endpoint-picker: scalecar-epp\n",
        )
        .unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.endpoint_picker.as_deref(), Some("scalecar-epp"));
        assert_eq!(k.kubeconfig.as_deref(), Some("/tmp/kc"));
        assert_eq!(k.namespaces, ["llm", "batch"]);
        assert!(!k.managed);
        assert_eq!(k.api_timeout, Duration::from_secs(3));
        assert_eq!(
            k.kinds,
            [KindConfig {
                group: "serving.example.com".into(),
                version: "v1".into(),
                kind: "ModelServer".into()
            }]
        );
        for (text, want) in [
            (
                "kubernetes: {namespaces: [Bad_NS]}",
                "kubernetes.namespaces[0]: \"Bad_NS\" is not a namespace",
            ),
            (
                "kubernetes: {kinds: [{group: x, kind: Model}]}",
                "kubernetes.kinds[0].version: is required",
            ),
            (
                "kubernetes: {kinds: [{version: v1, kind: model}]}",
                "kubernetes.kinds[0].kind: \"model\" is not a kind",
            ),
            (
                "kubernetes: {kinds: [{group: \"a b\", version: v1, kind: M}]}",
                "kubernetes.kinds[0].group",
            ),
            ("kubernetes: {api-timeout: soon}", "kubernetes.api-timeout"),
            (
                "kubernetes: {endpoint-picker: Scalecar_EPP}",
                "kubernetes.endpoint-picker: \"Scalecar_EPP\" is not a Service name",
            ),
        ] {
            let err = errors(text);
            assert!(err.contains(want), "{text}\n→ {err}");
        }
        assert!(errors("kubernetes: {namespace: [a]}").contains("did you mean namespaces"));
        let c = ScalecarConfig::from_yaml_str("kubernetes: {leader-election: {}}").unwrap();
        assert_eq!(
            c.kubernetes.unwrap().leader_election,
            Some(LeaderElectionConfig::default())
        );
        // Whoever patches elects, unless told not to; advisory need not.
        let election = |text: &str| {
            ScalecarConfig::from_yaml_str(text)
                .unwrap()
                .kubernetes
                .unwrap()
                .leader_election
        };
        assert_eq!(
            election("kubernetes: {}"),
            Some(LeaderElectionConfig::default())
        );
        assert_eq!(election("kubernetes: {managed: false}"), None);
        assert_eq!(
            election("kubernetes: {leader-election: {enabled: false}}"),
            None
        );
        assert_eq!(
            election("kubernetes: {managed: false, leader-election: {enabled: true}}"),
            Some(LeaderElectionConfig::default())
        );
        let e = errors("kubernetes: {leader-election: {lease-duration: 5s, renew-deadline: 6s}}");
        assert!(
            e.contains("renew-deadline 6s must be shorter than lease-duration 5s"),
            "{e}"
        );
        let e = errors("kubernetes: {leader-election: {renew-deadline: 2s, retry-period: 3s}}");
        assert!(e.contains("retry-period 3s must be shorter"), "{e}");
        // The leader's memory: on by default, renamed, or off.
        let memory = |text: &str| election(text).and_then(|l| l.memory_config_map);
        assert_eq!(memory("kubernetes: {}").as_deref(), Some("scalecar-memory"));
        assert_eq!(
            memory("kubernetes: {leader-election: {memory-config-map: gw.memory}}").as_deref(),
            Some("gw.memory")
        );
        assert_eq!(
            memory("kubernetes: {leader-election: {memory-config-map: \"\"}}"),
            None
        );
        let e = errors("kubernetes: {leader-election: {memory-config-map: Gw_Memory}}");
        assert!(
            e.contains("kubernetes.leader-election.memory-config-map: \"Gw_Memory\" is not a ConfigMap name"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_a_suggestion() {
        let err = errors("limts: {}\npools: [{model: m}]");
        assert!(
            err.contains("limts") && err.contains("did you mean limits?"),
            "{err}"
        );
        let err = errors("- just\n- a list");
        assert!(!err.is_empty());
    }

    #[test]
    fn bare_policy_files_accept_numbers_and_strings() {
        let keys = policy_keys_from_yaml_str(
            "algorithm: kpa\ntarget: 10\ntarget-utilization-percentage: \"100\"\nwindow: 20s\n",
        )
        .unwrap();
        let p = Policy::from_keys(&keys, Role::Unified).unwrap();
        assert_eq!((p.target, p.target_utilization), (10.0, 1.0));
        assert_eq!(policy_keys_from_yaml_str("").unwrap().len(), 0);
        assert!(policy_keys_from_yaml_str("target: [1, 2]").is_err());
    }
}
