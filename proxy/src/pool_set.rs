//! The gateway's pool set: what pool sources (static config, feeds,
//! Kubernetes discovery) publish, and its one effect — the route table the
//! serving workers read and the target set the control loop decides.
//!
//! Sources hand over whole `Member`s; `PoolSet::publish` decides once
//! per pool which names route where (a name two pools claim in one role
//! goes to the first) and which pools the loop decides (a pool reached
//! through any of its names). It knows nothing of where members come from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use scalecar_config::Role;
use scalecar_scaler::control::TargetSpec;
use tokio::sync::{Notify, watch};

use crate::routes::{ModelRoute, PoolEntry, RouteTable, Routes};

/// A pool and what the control loop knows of it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub entry: Arc<PoolEntry>,
    /// The other names routed to the same pool, each with its own
    /// per-request metrics; decided once, through `spec`.
    pub aliases: Vec<Arc<PoolEntry>>,
    pub spec: TargetSpec,
}

impl Member {
    /// Every name this pool serves, with the entry that routes it: the
    /// workload's own first.
    pub(crate) fn names(&self) -> impl Iterator<Item = (&str, &Arc<PoolEntry>)> {
        std::iter::once(&self.entry)
            .chain(&self.aliases)
            .map(|e| (e.model.as_str(), e))
    }
}

/// All pools of the gateway: the fixed ones (static config, feeds) and the
/// discovered ones, published as routes and control-loop targets.
#[derive(Debug)]
pub(crate) struct PoolSet {
    pub table: Arc<RouteTable>,
    pub fixed: Vec<Member>,
    pub discovered: Mutex<Vec<Member>>,
    pub targets: watch::Sender<Vec<TargetSpec>>,
    pub poke: Arc<Notify>,
}

impl PoolSet {
    /// Replaces the discovered pools and publishes.
    pub fn set_discovered(&self, members: Vec<Member>) {
        let Ok(mut d) = self.discovered.lock() else {
            return;
        };
        *d = members;
        self.publish(&d);
    }

    pub(crate) fn publish(&self, discovered: &[Member]) {
        let members: Vec<&Member> = self.fixed.iter().chain(discovered).collect();
        // model → role → (member index, entry routing that name).
        let mut by_model: BTreeMap<&str, BTreeMap<Role, (usize, &Arc<PoolEntry>)>> =
            BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            for (name, entry) in m.names() {
                let roles = by_model.entry(name).or_default();
                if let Some((first, _)) = roles.get(&m.spec.role) {
                    tracing::warn!(
                        model = %name, role = %m.spec.role,
                        kept = %members.get(*first).map_or("", |f| f.spec.name.as_str()),
                        ignored = %m.spec.name, "two pools serve one model in one role; the first is kept"
                    );
                    continue;
                }
                roles.insert(m.spec.role, (i, entry));
            }
            // A request waiting on an empty pool makes the loop decide at
            // once (scale from zero).
            let poke = self.poke.clone();
            m.entry.pool.on_empty(Arc::new(move || poke.notify_one()));
        }
        let mut routes = Routes::new();
        // A member is decided once however many names route to it.
        let mut decided = vec![false; members.len()];
        for (model, mut roles) in by_model {
            let route = match (
                roles.remove(&Role::Unified),
                roles.remove(&Role::Prefill),
                roles.remove(&Role::Decode),
            ) {
                (Some(u), p, d) => {
                    if let Some((x, _)) = p.or(d) {
                        tracing::warn!(
                            %model, ignored = %members.get(x).map_or("", |m| m.spec.name.as_str()),
                            "a model served unified has no prefill or decode pools"
                        );
                    }
                    vec![u]
                }
                (None, Some(p), Some(d)) => vec![p, d],
                (None, Some(only), None) | (None, None, Some(only)) => vec![only],
                (None, None, None) => continue,
            };
            let r = match route.as_slice() {
                [(_, p), (_, d)] => ModelRoute::Disaggregated {
                    prefill: Arc::clone(p),
                    decode: Arc::clone(d),
                },
                [(_, u), ..] => ModelRoute::Unified(Arc::clone(u)),
                [] => continue,
            };
            for (i, _) in &route {
                if let Some(d) = decided.get_mut(*i) {
                    *d = true;
                }
            }
            routes.insert(model.to_string(), r);
        }
        let specs = members
            .iter()
            .zip(&decided)
            .filter(|(_, d)| **d)
            .map(|(m, _)| m.spec.clone())
            .collect();
        self.table.store(routes);
        self.targets.send_replace(specs);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use prometheus_client::registry::Registry;
    use scalecar_config::Policy;
    use scalecar_scaler::clock::{Clock, MonotonicClock};
    use scalecar_scaler::control::Scaling;
    use scalecar_scaler::signals::{PoolSignals, SignalsConfig};

    use crate::metrics::ProxyMetrics;
    use crate::pool::Pool;

    fn member(metrics: &ProxyMetrics, name: &str, model: &str, aliases: &[&str]) -> Member {
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::for_window(Duration::from_secs(60)),
            clock,
        ));
        let pool = Pool::new(
            model.to_string(),
            Role::Unified,
            Vec::new(),
            signals.clone(),
            None,
            8,
        );
        let alias = |n: &&str| {
            Arc::new(PoolEntry {
                model: n.to_string(),
                metrics: metrics.alias(n, Role::Unified),
                pool: pool.clone(),
            })
        };
        Member {
            aliases: aliases.iter().map(alias).collect(),
            entry: Arc::new(PoolEntry {
                model: model.to_string(),
                metrics: metrics.pool(model, Role::Unified),
                pool: pool.clone(),
            }),
            spec: TargetSpec {
                name: name.to_string(),
                model: model.to_string(),
                role: Role::Unified,
                policy: Policy::default(),
                signals,
                scaling: Scaling::Advisory {
                    ready: Arc::new(AtomicU32::new(0)),
                },
            },
        }
    }

    #[test]
    fn every_name_routes_to_its_pool_and_each_pool_is_one_target() {
        let metrics = ProxyMetrics::register(&mut Registry::default());
        let (targets, rx) = watch::channel(Vec::new());
        let set = PoolSet {
            table: Arc::new(RouteTable::default()),
            fixed: Vec::new(),
            discovered: Mutex::new(Vec::new()),
            targets,
            poke: Arc::new(Notify::new()),
        };
        set.set_discovered(vec![
            member(&metrics, "a", "a", &["a-lora", "shared"]),
            // Its alias "a" is the first workload's name: the first keeps it.
            member(&metrics, "b", "b", &["a", "shared", "b-lora"]),
            // Its own name taken, it is still reached (and decided)
            // through its alias.
            member(&metrics, "c", "a", &["c-only"]),
            // Nothing of it left to route: not decided.
            member(&metrics, "d", "b", &["a-lora"]),
        ]);
        let routes = set.table.snapshot();
        let served_by = |name: &str| match routes.get(name) {
            Some(ModelRoute::Unified(e)) => {
                assert_eq!(e.model, name, "the entry is the name's own");
                e.pool.model.clone()
            }
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(served_by("a"), "a");
        assert_eq!(served_by("a-lora"), "a");
        assert_eq!(served_by("shared"), "a");
        assert_eq!(served_by("b"), "b");
        assert_eq!(served_by("b-lora"), "b");
        assert_eq!(served_by("c-only"), "a");
        assert_eq!(routes.len(), 6);
        let mut decided: Vec<String> = rx.borrow().iter().map(|s| s.name.clone()).collect();
        decided.sort();
        assert_eq!(decided, ["a", "b", "c"]);
        // Each pool once, by its own name where that is routed.
        let entries: Vec<(String, String)> = set
            .table
            .entries()
            .iter()
            .map(|e| (e.pool.model.clone(), e.model.clone()))
            .collect();
        assert_eq!(
            entries,
            [
                ("a".to_string(), "a".to_string()),
                ("a".to_string(), "c-only".to_string()),
                ("b".to_string(), "b".to_string()),
            ]
        );
        let names = set.table.names_by_pool();
        let of = |e: &Arc<PoolEntry>| names.get(&Arc::as_ptr(&e.pool)).cloned().unwrap();
        let all = set.table.entries();
        assert_eq!(of(&all[0]), ["a", "a-lora", "shared"]);
        assert_eq!(of(&all[1]), ["c-only"]);
        assert_eq!(of(&all[2]), ["b", "b-lora"]);
    }
}
