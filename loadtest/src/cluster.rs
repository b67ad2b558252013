//! The local cluster: model-sim replicas in this process, behind the same
//! `ScaleTarget` trait as a Kubernetes Deployment, so the demo and the e2e
//! tests run the production control loop.
//!
//! A new replica listens on its own 127.0.0.1 port at once but is ready only
//! after its start-up delay (as a pod that pulls weights). A removed replica
//! leaves the pool's endpoints at once, stops taking new requests and drains
//! what it has. The pool's endpoints follow the ready replicas through a
//! `watch` channel; the set changes only when readiness does.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use scalecar_scaler::target::{BoxFuture, ScaleState, ScaleTarget, TargetError, TargetRef};
use tokio::sync::watch;

use crate::sim::{ModelSim, SimConfig, SimHandle};

/// The API version and kind the local cluster registers under.
pub const LOCAL_API_VERSION: &str = "scalecar.io/v1alpha1";
pub const LOCAL_KIND: &str = "LocalModelPool";

struct Replica {
    handle: SimHandle,
    addr: SocketAddr,
}

struct State {
    /// Replicas serving or starting, oldest first.
    replicas: Vec<Replica>,
    /// Replicas removed and draining.
    draining: Vec<SimHandle>,
}

/// One pool of simulated replicas (one model, one role).
pub struct LocalPool {
    target: TargetRef,
    template: SimConfig,
    state: Mutex<State>,
    endpoints: watch::Sender<Vec<SocketAddr>>,
}

impl fmt::Debug for LocalPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl LocalPool {
    /// A pool named `name` whose replicas run `template` (its listen address
    /// is ignored: each replica binds its own port). Starts with `initial`
    /// replicas already warm (an existing Deployment); replicas added later
    /// become ready after the template's start-up delay.
    /// The returned task keeps the endpoint set in step with readiness; it
    /// ends when the pool is dropped.
    pub async fn start(
        name: &str,
        template: SimConfig,
        initial: u32,
    ) -> Result<Arc<LocalPool>, TargetError> {
        let (endpoints, _) = watch::channel(Vec::new());
        let pool = Arc::new(LocalPool {
            target: TargetRef {
                api_version: LOCAL_API_VERSION.into(),
                kind: LOCAL_KIND.into(),
                namespace: "local".into(),
                name: name.into(),
            },
            template,
            state: Mutex::new(State {
                replicas: Vec::new(),
                draining: Vec::new(),
            }),
            endpoints,
        });
        pool.grow(initial, Duration::ZERO).await?;
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.refresh_endpoints();
            }
        });
        Ok(pool)
    }

    /// The pool's ready endpoints, updated as replicas become ready or go.
    pub fn endpoints(&self) -> watch::Receiver<Vec<SocketAddr>> {
        self.endpoints.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not take the cluster down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_endpoints(&self) {
        let ready: Vec<SocketAddr> = {
            let mut state = self.lock();
            state.draining.retain(|h| !h.is_drained());
            state
                .replicas
                .iter()
                .filter(|r| r.handle.is_ready())
                .map(|r| r.addr)
                .collect()
        };
        self.endpoints.send_if_modified(|current| {
            if *current == ready {
                false
            } else {
                *current = ready;
                true
            }
        });
    }

    fn error(&self, message: impl Into<String>) -> TargetError {
        TargetError::Unavailable {
            target: self.target.to_string(),
            message: message.into(),
        }
    }

    /// Adds replicas up to `replicas`, each ready after `startup_delay`.
    async fn grow(&self, replicas: u32, startup_delay: Duration) -> Result<(), TargetError> {
        let want = replicas as usize;
        let have = self.lock().replicas.len();
        // Bind outside the lock (binding is async).
        let mut fresh = Vec::new();
        for _ in have..want {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| self.error(format!("binding a replica port: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| self.error(format!("replica port: {e}")))?;
            let config = SimConfig {
                startup_delay,
                ..self.template.clone()
            };
            let handle = ModelSim::spawn(config, listener);
            fresh.push(Replica { handle, addr });
        }
        self.lock().replicas.extend(fresh);
        self.refresh_endpoints();
        Ok(())
    }

    async fn resize(&self, replicas: u32) -> Result<(), TargetError> {
        let want = replicas as usize;
        self.grow(replicas, self.template.startup_delay).await?;
        {
            let mut state = self.lock();
            // Shrink: not-ready replicas go first (they serve nothing), then
            // the newest.
            while state.replicas.len() > want {
                let victim = state
                    .replicas
                    .iter()
                    .rposition(|r| !r.handle.is_ready())
                    .unwrap_or(state.replicas.len() - 1);
                let r = state.replicas.remove(victim);
                r.handle.drain();
                state.draining.push(r.handle);
            }
        }
        self.refresh_endpoints();
        Ok(())
    }

    /// Replicas still draining after removal.
    pub fn draining(&self) -> usize {
        let mut state = self.lock();
        state.draining.retain(|h| !h.is_drained());
        state.draining.len()
    }
}

impl ScaleTarget for LocalPool {
    fn target_ref(&self) -> &TargetRef {
        &self.target
    }

    fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
        let state = self.lock();
        let spec = state.replicas.len() as u32;
        let ready = state
            .replicas
            .iter()
            .filter(|r| r.handle.is_ready())
            .count() as u32;
        drop(state);
        Box::pin(async move { Ok(ScaleState { spec, ready }) })
    }

    fn set_replicas(&self, replicas: u32) -> BoxFuture<'_, Result<(), TargetError>> {
        Box::pin(self.resize(replicas))
    }
}
