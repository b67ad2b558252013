//! kube-sim: a Kubernetes API server for tests and the demo, speaking the
//! real wire protocol (REST + JSON, watches as JSON lines, Status errors)
//! with the semantics clients rely on, so that `kubectl` and kube-rs work
//! against it unchanged.
//!
//! What it is: discovery; the core, apps, discovery, coordination, events,
//! rbac and apiextensions types scalecar meets, plus two custom kinds in
//! `serving.example.com/v1` (`ModelServer` with a `/scale` subresource,
//! `ModelBackend` without); get, list (label and field selectors,
//! `limit`/`continue`), create, update, delete, merge/JSON/strategic patches
//! and server-side apply (as a merge of the applied fields), watch (resume
//! from a resourceVersion, 410 when compacted, bookmarks), `/scale` and
//! `/status`; one cluster-wide resourceVersion, optimistic concurrency,
//! `generation`; controllers that turn workloads into Pods on their own
//! loopback addresses running in-process model-sims, readiness from
//! `/health`, graceful termination, EndpointSlices; a kubelet's strictness
//! where installs fail (a Pod whose ConfigMaps or Secrets are missing waits
//! in `CreateContainerConfigError` or `ContainerCreating`, with the
//! kubelet's Warning Event, until they exist); fault injection.
//!
//! What it is not: a full apiserver. No authentication or admission, no
//! OpenAPI schemas (clients must not validate: `kubectl apply
//! --validate=false`), no protobuf (JSON only: `kubectl create <kind>`
//! sends protobuf, `kubectl apply` does not), no garbage collection beyond the
//! Pods of deleted workloads, no consistent snapshots across list pages (a
//! page continues from the last name returned, in the current state).
//!
//! Invariants: every change gets the next resourceVersion and is seen by
//! every watch that covers it, once, in order (the store broadcasts while
//! it holds its lock); no input from a client panics the server.

mod api;
mod controller;
pub mod faults;
mod kubelet;
mod patch;
pub mod resources;
pub mod runner;
mod selector;
pub mod store;
mod table;
mod time;
mod view;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use api::RequestRecord;
pub use controller::sim_of;
pub use faults::{Fault, Faults, Rule};
pub use patch::{json_patch, merge, strategic};
pub use selector::{FieldSelector, LabelSelector};
pub use store::{ApiError, Store};

/// How a kube-sim runs.
#[derive(Debug, Clone)]
pub struct KubeSimConfig {
    /// Changes kept for watches to resume from (older: 410 Gone).
    pub history: usize,
    /// Run the controllers (workloads → Pods → model-sims, EndpointSlices).
    pub controllers: bool,
    /// Pods of these images run the real binaries (see [`runner`]).
    pub run_images: Vec<runner::RunImage>,
}

impl Default for KubeSimConfig {
    fn default() -> Self {
        KubeSimConfig {
            history: 10_000,
            controllers: true,
            run_images: Vec::new(),
        }
    }
}

/// A running kube-sim. Dropping it stops the server and the controllers
/// (and every Pod's model-sim).
#[derive(Debug)]
pub struct KubeSim {
    addr: SocketAddr,
    api: Arc<api::Api>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The kubeconfig written for run-image Pods (removed on drop).
    pod_kubeconfig: Option<std::path::PathBuf>,
}

impl KubeSim {
    /// Serves on `listener` (plain HTTP).
    pub fn start(config: KubeSimConfig, listener: TcpListener) -> std::io::Result<KubeSim> {
        let addr = listener.local_addr()?;
        let store = Store::new(config.history);
        let faults = Arc::new(Faults::default());
        let api = Arc::new(api::Api::new(store.clone(), faults.clone(), addr));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut pod_kubeconfig = None;
        if config.controllers {
            let mut c = controller::Controller::new(store);
            if !config.run_images.is_empty() {
                // What the Pods' processes reach the API with.
                let path = std::env::temp_dir().join(format!(
                    "kube-sim-{}-{}-pods.kubeconfig",
                    std::process::id(),
                    addr.port()
                ));
                std::fs::write(&path, kubeconfig(&format!("http://{addr}")))?;
                c = c.run_images(config.run_images.clone(), path.clone());
                pod_kubeconfig = Some(path);
            }
            tasks.push(tokio::spawn(c.run(stop_rx.clone())));
        }
        tasks.push(tokio::spawn(serve(listener, api.clone(), stop_rx)));
        Ok(KubeSim {
            addr,
            api,
            stop,
            tasks,
            pod_kubeconfig,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.api.store
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.api.faults
    }

    /// Every request served so far (method, path and query, status).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.api.requests()
    }

    /// Watches answered 410 Expired so far (their version was compacted).
    pub fn expired_watches(&self) -> u64 {
        self.api.expired_watches()
    }

    /// A kubeconfig for this server (context `kube-sim`, namespace
    /// `default`).
    pub fn kubeconfig(&self) -> String {
        kubeconfig(&self.url())
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Stops serving and reconciling.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        if let Some(p) = &self.pod_kubeconfig {
            let _ = std::fs::remove_file(p);
        }
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A kubeconfig pointing at `url` (no credentials: kube-sim has no auth).
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {url}\nusers:\n- name: kube-sim\n  user: {{}}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\n"
    )
}

async fn serve(listener: TcpListener, api: Arc<api::Api>, mut stop: watch::Receiver<bool>) {
    let mut retry = crate::accept::AcceptRetry::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            accepted = listener.accept() => Some(accepted),
        };
        let (stream, _) = match accepted {
            None => return,
            Some(Ok(a)) => {
                retry.accepted("kube-sim");
                a
            }
            Some(Err(e)) => {
                tokio::time::sleep(retry.failed("kube-sim", &e)).await;
                continue;
            }
        };
        if api.faults.refusing() {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        tokio::spawn(async move {
            let faults = api.faults.clone();
            let svc = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            // An outage cuts open connections too (keep-alive, watches), as
            // a server that goes away does.
            let outage = async {
                while !faults.refusing() {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                _ = outage => {}
            }
        });
    }
}
