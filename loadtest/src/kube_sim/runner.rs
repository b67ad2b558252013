//! Pods that run a real binary: `kube-sim --run-image IMAGE=BINARY` makes
//! every Pod whose first container's image is IMAGE (any tag or digest) a
//! child process of BINARY, started as a kubelet would start the container:
//! its `command[1..]` and `args`, its `env` resolved (values, ConfigMap and
//! Secret keys, `fieldRef` to the Pod's name, namespace and IP), its
//! ConfigMap and Secret volumes written out under a directory of its own
//! and their mount paths in the arguments pointed there. `KUBECONFIG`
//! points at this kube-sim (the in-cluster path cannot be had).
//!
//! Pods share the host's network here, so a wildcard listen address in a
//! mounted file (`0.0.0.0:PORT`) is narrowed to the Pod's own IP: two Pods
//! of one Deployment then listen side by side, each on its address, as in
//! a cluster. Readiness is the container's `readinessProbe.httpGet` against
//! the Pod's IP (a TCP connect to its first port without one). Deletion
//! sends SIGTERM and, after the grace period, SIGKILL.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::resources::{Storage, of_storage};
use super::store::Store;

/// An image run as a real process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunImage {
    /// The image name without tag or digest, e.g. `ghcr.io/scalecar/scalecar`.
    pub image: String,
    pub binary: PathBuf,
}

impl std::str::FromStr for RunImage {
    type Err = String;

    /// `IMAGE=BINARY`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (image, binary) = s
            .split_once('=')
            .filter(|(i, b)| !i.is_empty() && !b.is_empty())
            .ok_or_else(|| format!("{s:?}: expected IMAGE=BINARY"))?;
        Ok(RunImage {
            image: image_name(image).to_string(),
            binary: PathBuf::from(binary),
        })
    }
}

/// `repo/name:tag@sha256:…` → `repo/name` (a registry port stays).
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// The run-image a container's image matches.
pub fn matching<'a>(images: &'a [RunImage], container: &Value) -> Option<&'a RunImage> {
    let image = container.get("image").and_then(Value::as_str)?;
    images.iter().find(|r| r.image == image_name(image))
}

/// What readiness is probed with.
#[derive(Debug, Clone)]
enum Probe {
    Http { port: u16, path: String },
    Tcp(u16),
    None,
}

/// A Pod's container running as a process.
#[derive(Debug)]
pub struct Process {
    child: tokio::process::Child,
    dir: PathBuf,
    probe: Probe,
    ip: Ipv4Addr,
    terminated: bool,
}

impl Process {
    /// Starts `run` for `pod` (in `ns`) on `ip`.
    pub fn spawn(
        store: &Store,
        ns: &str,
        pod: &Value,
        ip: Ipv4Addr,
        run: &RunImage,
        kubeconfig: &Path,
    ) -> Result<Process, String> {
        let container = pod
            .pointer("/spec/containers/0")
            .cloned()
            .unwrap_or_default();
        let name = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("pod");
        let dir = std::env::temp_dir().join(format!(
            "kube-sim-pod-{}-{ns}-{name}-{ip}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mounts = materialize(store, ns, pod, &container, ip, &dir)?;
        let at = |s: &str| -> String {
            mounts
                .iter()
                .filter(|(mount, _)| s == mount.as_str() || s.starts_with(&format!("{mount}/")))
                .max_by_key(|(mount, _)| mount.len())
                .map_or_else(
                    || s.to_string(),
                    |(mount, local)| format!("{}{}", local.display(), &s[mount.len()..]),
                )
        };
        let strings = |field: &str| -> Vec<String> {
            container
                .get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(&at)
                .collect()
        };
        // `command` replaces the image's entrypoint (the binary itself).
        let mut argv: Vec<String> = strings("command").into_iter().skip(1).collect();
        argv.extend(strings("args"));
        let mut cmd = tokio::process::Command::new(&run.binary);
        cmd.args(&argv)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", &dir)
            .current_dir(&dir)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        for (k, v) in env_of(store, ns, pod, &container, ip)? {
            cmd.env(k, v);
        }
        let log = |n: &str| {
            std::fs::File::create(dir.join(n))
                .map(std::process::Stdio::from)
                .map_err(|e| format!("{n}: {e}"))
        };
        cmd.stdout(log("stdout.log")?).stderr(log("stderr.log")?);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", run.binary.display()))?;
        tracing::info!(pod = %name, namespace = %ns, %ip, binary = %run.binary.display(), ?argv, dir = %dir.display(), "pod runs a real process");
        Ok(Process {
            child,
            dir,
            probe: probe_of(&container),
            ip,
            terminated: false,
        })
    }

    /// Whether the process answers its readiness probe.
    pub async fn ready(&mut self) -> bool {
        if self.exited() {
            return false;
        }
        match &self.probe {
            Probe::None => true,
            Probe::Tcp(port) => tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(SocketAddr::from((self.ip, *port))),
            )
            .await
            .is_ok_and(|c| c.is_ok()),
            Probe::Http { port, path } => {
                super::controller::http_ok(SocketAddr::from((self.ip, *port)), path).await
            }
        }
    }

    /// Whether the process has ended.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The last line it wrote to stderr (for a Pod that stopped).
    pub fn last_words(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }

    /// SIGTERM, once.
    pub fn terminate(&mut self) {
        if self.terminated {
            return;
        }
        self.terminated = true;
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn probe_of(container: &Value) -> Probe {
    let ports: HashMap<&str, u16> = container
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?,
                u16::try_from(p.get("containerPort")?.as_u64()?).ok()?,
            ))
        })
        .collect();
    let port_of = |v: &Value| match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => ports.get(s.as_str()).copied().or_else(|| s.parse().ok()),
        _ => None,
    };
    if let Some(get) = container.pointer("/readinessProbe/httpGet")
        && let Some(port) = get.get("port").and_then(port_of)
    {
        let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        return Probe::Http {
            port,
            path: path.to_string(),
        };
    }
    container
        .pointer("/ports/0/containerPort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .map_or(Probe::None, Probe::Tcp)
}

/// Writes the container's ConfigMap and Secret volumes under `dir`;
/// returns (mount path, local directory) pairs.
fn materialize(
    store: &Store,
    ns: &str,
    pod: &Value,
    container: &Value,
    ip: Ipv4Addr,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    let volumes: HashMap<&str, &Value> = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v.get("name")?.as_str()?, v)))
        .collect();
    let mut mounts = Vec::new();
    for m in container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(name), Some(path)) = (
            m.get("name").and_then(Value::as_str),
            m.get("mountPath").and_then(Value::as_str),
        ) else {
            continue;
        };
        let local = dir.join("volumes").join(name);
        std::fs::create_dir_all(&local).map_err(|e| format!("{}: {e}", local.display()))?;
        if let Some(v) = volumes.get(name) {
            let (object, secret) = if let Some(c) = v.get("configMap") {
                (lookup(store, Storage::ConfigMaps, ns, c.get("name")), false)
            } else if let Some(s) = v.get("secret") {
                (
                    lookup(store, Storage::Secrets, ns, s.get("secretName")),
                    true,
                )
            } else {
                (None, false)
            };
            for (key, value) in object
                .as_ref()
                .map(|o| entries(o, secret))
                .unwrap_or_default()
            {
                // Pods share the host's network: a wildcard listen address
                // becomes the Pod's own.
                let value = String::from_utf8_lossy(&value)
                    .replace("0.0.0.0:", &format!("{ip}:"))
                    .into_bytes();
                let file = local.join(&key);
                std::fs::write(&file, value).map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
        mounts.push((path.trim_end_matches('/').to_string(), local));
    }
    Ok(mounts)
}

fn lookup(store: &Store, storage: Storage, ns: &str, name: Option<&Value>) -> Option<Value> {
    let name = name?.as_str()?;
    store.get(of_storage(storage), ns, name).ok()
}

/// A ConfigMap's or Secret's keys and their bytes.
fn entries(object: &Value, secret: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Some(data) = object.get("data").and_then(Value::as_object) {
        for (k, v) in data {
            let text = v.as_str().unwrap_or_default();
            let bytes = if secret {
                decode_base64(text).unwrap_or_default()
            } else {
                text.as_bytes().to_vec()
            };
            out.push((k.clone(), bytes));
        }
    }
    if let Some(data) = object.get("stringData").and_then(Value::as_object) {
        for (k, v) in data {
            out.push((
                k.clone(),
                v.as_str().unwrap_or_default().as_bytes().to_vec(),
            ));
        }
    }
    out
}

/// The container's environment as a kubelet resolves it.
fn env_of(
    store: &Store,
    ns: &str,
    pod: &Value,
    container: &Value,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for e in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = e.get("name").and_then(Value::as_str) else {
            continue;
        };
        if let Some(v) = e.get("value").and_then(Value::as_str) {
            out.push((name.to_string(), v.to_string()));
            continue;
        }
        let Some(from) = e.get("valueFrom") else {
            out.push((name.to_string(), String::new()));
            continue;
        };
        let value = if let Some(f) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
            match f {
                "status.podIP" => Some(ip.to_string()),
                "spec.nodeName" => Some("kube-sim".to_string()),
                path => path
                    .strip_prefix("metadata.")
                    .and_then(|m| pod.pointer(&format!("/metadata/{m}")))
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| (path == "metadata.namespace").then(|| ns.to_string())),
            }
        } else {
            let (r, storage, secret) = match (from.get("secretKeyRef"), from.get("configMapKeyRef"))
            {
                (Some(r), _) => (r, Storage::Secrets, true),
                (None, Some(r)) => (r, Storage::ConfigMaps, false),
                (None, None) => continue,
            };
            let key = r.get("key").and_then(Value::as_str).unwrap_or_default();
            lookup(store, storage, ns, r.get("name")).and_then(|o| {
                entries(&o, secret)
                    .into_iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
            })
        };
        // Missing and optional: the variable is not set (missing and not
        // optional never gets here: the kubelet check held the Pod).
        if let Some(v) = value {
            out.push((name.to_string(), v));
        }
    }
    Ok(out)
}

/// Standard base64 (Secrets' `data`), padding optional.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let take = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_names_lose_their_tag_and_digest_only() {
        assert_eq!(
            image_name("ghcr.io/scalecar/scalecar:0.1.0"),
            "ghcr.io/scalecar/scalecar"
        );
        assert_eq!(
            image_name("ghcr.io/scalecar/scalecar@sha256:ab"),
            "ghcr.io/scalecar/scalecar"
        );
        assert_eq!(
            image_name("registry:5000/scalecar"),
            "registry:5000/scalecar"
        );
        assert_eq!(
            image_name("registry:5000/scalecar:1"),
            "registry:5000/scalecar"
        );
        let r: RunImage = "ghcr.io/scalecar/scalecar:latest=/bin/true"
            .parse()
            .unwrap();
        assert_eq!(r.image, "ghcr.io/scalecar/scalecar");
        assert!("no-binary".parse::<RunImage>().is_err());
        assert!(matching(&[r], &json!({"image": "ghcr.io/scalecar/scalecar:0.2.0"})).is_some());
    }

    #[test]
    fn base64_decodes_as_secrets_hold_it() {
        assert_eq!(decode_base64("czNjcmV0").unwrap(), b"s3cret");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert!(decode_base64("not*base64").is_none());
    }

    #[test]
    fn probes_follow_the_container_spec() {
        let c = json!({"ports": [{"name": "admin", "containerPort": 9090}],
                       "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}}});
        assert!(matches!(probe_of(&c), Probe::Http { port: 9090, ref path } if path == "/readyz"));
        assert!(matches!(
            probe_of(&json!({"ports": [{"containerPort": 8080}]})),
            Probe::Tcp(8080)
        ));
        assert!(matches!(probe_of(&json!({})), Probe::None));
    }

    #[test]
    fn volumes_are_written_out_and_env_resolved() {
        let store = Store::new(16);
        store
            .create(
                of_storage(Storage::ConfigMaps),
                "default",
                json!({"metadata": {"name": "cfg"}, "data": {"app.yaml": "listen: 0.0.0.0:8080\n"}}),
            )
            .unwrap();
        store
            .create(
                of_storage(Storage::Secrets),
                "default",
                json!({"metadata": {"name": "tok"}, "data": {"token": "czNjcmV0"}}),
            )
            .unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {"volumes": [{"name": "config", "configMap": {"name": "cfg"}}],
                     "containers": [{"name": "c",
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
                        "env": [{"name": "A", "value": "1"},
                                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}}]}]}});
        let dir = std::env::temp_dir().join(format!("kube-sim-runner-test-{}", std::process::id()));
        let ip = Ipv4Addr::new(127, 0, 0, 9);
        let container = pod.pointer("/spec/containers/0").unwrap();
        let mounts = materialize(&store, "default", &pod, container, ip, &dir).unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].0, "/etc/app");
        let written = std::fs::read_to_string(mounts[0].1.join("app.yaml")).unwrap();
        assert_eq!(written, "listen: 127.0.0.9:8080\n");
        let env = env_of(&store, "default", &pod, container, ip).unwrap();
        assert_eq!(
            env,
            [("A", "1"), ("POD", "p"), ("NS", "default"), ("T", "s3cret")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
