//! The route table: which pools serve which model. Read by every request,
//! replaced whole when discovery changes a pool (`ArcSwap`): a request
//! takes the route it found and keeps its pool alive through the entry's
//! reference count, so a pool removed or replaced meanwhile finishes the
//! requests it holds and gets no new ones.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::metrics::PoolMetrics;
use crate::pool::Pool;

/// A pool with its metric handles, under one of the names it serves.
#[derive(Debug, Clone)]
pub struct PoolEntry {
    /// The model name this entry routes: the pool's own (`pool.model`),
    /// or another name its pods serve (a LoRA adapter, an alias).
    pub model: String,
    pub pool: Arc<Pool>,
    pub metrics: PoolMetrics,
}

impl PoolEntry {
    /// The entry of the pool's own name (the one whose metrics carry the
    /// pool's gauges), not an alias.
    pub fn is_primary(&self) -> bool {
        self.model == self.pool.model
    }
}

/// Where a model's requests go. Entries are shared by the workers and by
/// each request's observation (one reference count, not one per metric).
#[derive(Debug, Clone)]
pub enum ModelRoute {
    Unified(Arc<PoolEntry>),
    Disaggregated {
        prefill: Arc<PoolEntry>,
        decode: Arc<PoolEntry>,
    },
}

/// Routes by served model name.
pub type Routes = HashMap<String, ModelRoute>;

impl ModelRoute {
    /// Its pools: one, or prefill then decode.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<PoolEntry>> {
        let (a, b) = match self {
            ModelRoute::Unified(e) => (e, None),
            ModelRoute::Disaggregated { prefill, decode } => (prefill, Some(decode)),
        };
        std::iter::once(a).chain(b)
    }
}

/// The routes now, swapped whole.
#[derive(Debug, Default)]
pub struct RouteTable {
    current: ArcSwap<Routes>,
}

impl RouteTable {
    pub fn new(routes: Routes) -> Self {
        RouteTable {
            current: ArcSwap::from_pointee(routes),
        }
    }

    /// The route of `model`, if any (two reference counts, no lock).
    pub fn get(&self, model: &str) -> Option<ModelRoute> {
        self.current.load().get(model).cloned()
    }

    /// All routes as they are now.
    pub fn snapshot(&self) -> Arc<Routes> {
        self.current.load_full()
    }

    /// Every pool once, by its own name's entry, sorted by model and
    /// role (a pool reached only through aliases — its own name routed to
    /// another workload — by its first alias).
    pub fn entries(&self) -> Vec<Arc<PoolEntry>> {
        let mut out: Vec<Arc<PoolEntry>> = self
            .current
            .load()
            .values()
            .flat_map(|r| r.entries().cloned())
            .collect();
        out.sort_by(|a, b| {
            (&a.pool.model, a.pool.role, !a.is_primary(), &a.model).cmp(&(
                &b.pool.model,
                b.pool.role,
                !b.is_primary(),
                &b.model,
            ))
        });
        let mut seen = std::collections::HashSet::new();
        out.retain(|e| seen.insert(Arc::as_ptr(&e.pool)));
        out
    }

    /// Every name routed to each pool (by the pool's address), sorted.
    pub fn names_by_pool(&self) -> HashMap<*const Pool, Vec<String>> {
        let mut out: HashMap<*const Pool, Vec<String>> = HashMap::new();
        for (name, r) in self.current.load().iter() {
            for e in r.entries() {
                out.entry(Arc::as_ptr(&e.pool))
                    .or_default()
                    .push(name.clone());
            }
        }
        for names in out.values_mut() {
            names.sort();
        }
        out
    }

    /// Replaces the routes.
    pub fn store(&self, routes: Routes) {
        self.current.store(Arc::new(routes));
    }
}
