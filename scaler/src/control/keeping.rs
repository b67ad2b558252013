//! The loop's memory between leaders (see [`crate::memory`]): loaded when
//! this replica starts leading, given to each target's algorithm when it
//! is created, saved every [`SAVE_EVERY`] while leading and once more when
//! the loop stops. A store that fails costs the memory, never a tick: the
//! periodic save runs beside the loop, and at most one at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{ControlLoop, DecisionObserver, Managed};
use crate::memory::{
    MEMORY_VERSION, Memories, MemoryError, MemoryEvent, MemoryStore, OLDEST_RECALLED, SAVE_EVERY,
    TargetMemory, policy_fingerprint,
};

/// How long the last save may take when the loop stops.
const LAST_SAVE: Duration = Duration::from_secs(3);

/// The store, and the memory loaded for targets not created yet.
#[derive(Debug)]
pub(super) struct Keeper {
    store: Arc<dyn MemoryStore>,
    /// This replica, as the document names its writer.
    holder: String,
    /// When the last save (or, until `loaded`, the last read) was tried.
    last_saved: Option<Duration>,
    /// This leadership has read the store (a document, usable or not, or
    /// none there): until then nothing is saved, so that a store that
    /// could not be read is not overwritten with a fresh start.
    loaded: bool,
    saving: Option<tokio::task::JoinHandle<()>>,
    /// The last periodic save of this leadership held no target: another
    /// empty one is not written (kpa and hpa keep none, and a cluster of
    /// them would otherwise write the same nothing every 30 s).
    saved_nothing: Arc<std::sync::atomic::AtomicBool>,
    /// By target name, with when each was saved (Unix seconds): discovery
    /// may bring a target after the memory was loaded.
    waiting: BTreeMap<String, (TargetMemory, u64)>,
}

impl Keeper {
    /// The memory loaded for `name`, taken.
    pub(super) fn waiting(&mut self, name: &str) -> Option<(TargetMemory, u64)> {
        self.waiting.remove(name)
    }

    /// A new leadership reads the store again before it saves.
    pub(super) fn new_leadership(&mut self) {
        self.loaded = false;
        self.last_saved = None;
        self.saved_nothing.store(false, Ordering::Relaxed);
    }
}

impl ControlLoop {
    /// Keeps memory in `store` between leaders, written as `holder`.
    pub fn remember_in(&mut self, store: Arc<dyn MemoryStore>, holder: &str) {
        self.keeper = Some(Keeper {
            store,
            holder: holder.to_string(),
            last_saved: None,
            loaded: false,
            saving: None,
            saved_nothing: Arc::default(),
            waiting: BTreeMap::new(),
        });
    }

    /// Reads the memory and gives each target its own, to start from when
    /// its algorithm is next created (a new leader's targets are all
    /// created afresh at their next tick; one read late, after a failed
    /// first read, recreates the targets it has memory for). Returns how
    /// many targets had memory; `Ok(0)` without a store or a document.
    /// Until a read succeeds this leadership saves nothing.
    pub async fn load_memory(&mut self) -> Result<usize, MemoryError> {
        let Some(k) = &mut self.keeper else {
            return Ok(0);
        };
        let place = k.store.place();
        let loaded = k.store.load().await;
        let text = match loaded {
            Ok(Some(text)) => text,
            Ok(None) => {
                k.loaded = true;
                self.observer.memory(MemoryEvent::Empty);
                tracing::info!(memory = %place, "no memory saved yet: every target starts afresh");
                return Ok(0);
            }
            Err(e) => {
                self.observer.memory(MemoryEvent::Failed);
                return Err(e);
            }
        };
        let doc = match Memories::parse(&place, &text) {
            Ok(d) => d,
            Err(e) => {
                // Read, but of no use here (another version's format, or
                // damaged): it will be overwritten, as a fresh start's.
                k.loaded = true;
                self.observer.memory(MemoryEvent::Failed);
                return Err(e);
            }
        };
        k.loaded = true;
        self.observer.memory(MemoryEvent::Loaded);
        let saved_at = doc.saved_at;
        k.waiting = doc
            .targets
            .into_iter()
            .map(|(name, m)| {
                let at = m.saved_at.unwrap_or(saved_at);
                (name, (m, at))
            })
            .collect();
        let n = k.waiting.len();
        for t in &mut self.targets {
            if let Some(m) = k.waiting.remove(&t.spec.name) {
                t.recall = Some(m);
                t.fresh = true;
            }
        }
        let ago = self.wall.unix_secs().saturating_sub(saved_at);
        tracing::info!(
            memory = %place, targets = n, saved_by = %doc.holder, ago_s = ago,
            "memory loaded: targets start from what the last leader learnt"
        );
        Ok(n)
    }

    /// The document to save now: every target's memory, and memory loaded
    /// but not used yet (a target not read or not discovered since),
    /// unchanged while it is young enough to be recalled.
    pub fn memories(&self) -> Memories {
        let now = self.clock.now();
        let unix = self.wall.unix_secs();
        let young = |at: u64| unix.saturating_sub(at) <= OLDEST_RECALLED.as_secs();
        let mut targets = BTreeMap::new();
        if let Some(k) = &self.keeper {
            for (name, (m, at)) in &k.waiting {
                if young(*at) {
                    targets.insert(name.clone(), carried(m, *at));
                }
            }
        }
        for t in &self.targets {
            let entry = match (&t.recall, t.fresh) {
                (Some((m, at)), true) if young(*at) => Some(carried(m, *at)),
                (_, true) => None,
                (_, false) => t.algorithm.remember(now).map(|state| TargetMemory {
                    algorithm: t.spec.policy.algorithm.clone(),
                    policy: policy_fingerprint(&t.spec.policy),
                    state,
                    saved_at: None,
                }),
            };
            if let Some(m) = entry {
                targets.insert(t.spec.name.clone(), m);
            }
        }
        Memories {
            version: MEMORY_VERSION,
            saved_at: unix,
            holder: self
                .keeper
                .as_ref()
                .map(|k| k.holder.clone())
                .unwrap_or_default(),
            targets,
        }
    }

    /// Saves the memory now, waiting for the store. Returns how many
    /// targets it holds.
    pub async fn save_memory(&mut self) -> Result<usize, MemoryError> {
        let Some((store, text, n)) = self.document() else {
            return Ok(0);
        };
        write(&*store, text, &*self.observer).await.map(|()| n)
    }

    /// The store, the document as text and its targets; `None` without a
    /// store, before this leadership has read it, or while this replica
    /// may not write (a leader past its renew deadline must not overwrite
    /// its successor's memory).
    fn document(&mut self) -> Option<(Arc<dyn MemoryStore>, String, usize)> {
        if self.write_guard.as_ref().is_some_and(|g| !g.may_write())
            || self.keeper.as_ref().is_some_and(|k| !k.loaded)
        {
            return None;
        }
        let doc = self.memories();
        let k = self.keeper.as_mut()?;
        let place = k.store.place();
        let all = doc.targets.len();
        match doc.to_json_fitting(&place) {
            Ok((text, left_out)) => {
                if !left_out.is_empty() {
                    tracing::warn!(
                        memory = %place, left_out = left_out.len(), first = %left_out[0],
                        "memory of some targets not saved: all of it would not fit one ConfigMap"
                    );
                }
                Some((k.store.clone(), text, all - left_out.len()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "memory not saved");
                self.observer.memory(MemoryEvent::Failed);
                None
            }
        }
    }

    /// Saves beside the loop when [`SAVE_EVERY`] has passed since the last
    /// save and none is under way; until this leadership has read the
    /// store, reads it again instead.
    pub(super) async fn keep_memory(&mut self) {
        let now = self.clock.now();
        let Some(k) = &mut self.keeper else { return };
        let due = k
            .last_saved
            .is_none_or(|t| now.saturating_sub(t) >= SAVE_EVERY);
        let busy = k.saving.as_ref().is_some_and(|h| !h.is_finished());
        if !due || busy {
            return;
        }
        if !k.loaded {
            k.last_saved = Some(now);
            self.load_on_leading().await;
            return;
        }
        let Some((store, text, n)) = self.document() else {
            return;
        };
        let observer = self.observer.clone();
        if let Some(k) = &mut self.keeper {
            k.last_saved = Some(now);
            if n == 0 && k.saved_nothing.load(Ordering::Relaxed) {
                return;
            }
            let saved_nothing = k.saved_nothing.clone();
            k.saving = Some(tokio::spawn(async move {
                let bytes = text.len();
                match write(&*store, text, &*observer).await {
                    Ok(()) => {
                        saved_nothing.store(n == 0, Ordering::Relaxed);
                        tracing::debug!(memory = %store.place(), targets = n, bytes, "memory saved");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "memory not saved; the next try is in {}s", SAVE_EVERY.as_secs());
                    }
                }
            }));
        }
    }

    /// The last save, when the loop stops while leading: a rolling update's
    /// successor starts from this tick's memory, not one up to
    /// [`SAVE_EVERY`] old. Bounded by [`LAST_SAVE`].
    pub(super) async fn save_before_stopping(&mut self) {
        if let Some(h) = self.keeper.as_mut().and_then(|k| k.saving.take()) {
            let _ = tokio::time::timeout(LAST_SAVE, h).await;
        }
        match tokio::time::timeout(LAST_SAVE, self.save_memory()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(targets = n, "memory saved for the next leader"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "memory not saved at shutdown"),
            Err(_) => tracing::warn!(
                "memory not saved at shutdown: the store took longer than {}s",
                LAST_SAVE.as_secs()
            ),
        }
    }

    /// Loads the memory on gaining leadership; a failure is logged, and
    /// every target starts afresh.
    pub(super) async fn load_on_leading(&mut self) {
        if self.keeper.is_none() {
            return;
        }
        if let Err(e) = self.load_memory().await {
            tracing::warn!(
                error = %e,
                "memory not loaded: targets start afresh, and nothing is saved until a read succeeds (tried every {}s)",
                SAVE_EVERY.as_secs()
            );
        }
    }
}

/// Writes `text` to `store` and tells `observer` how it went.
async fn write(
    store: &dyn MemoryStore,
    text: String,
    observer: &dyn DecisionObserver,
) -> Result<(), MemoryError> {
    let saved = store.save(text).await;
    observer.memory(if saved.is_ok() {
        MemoryEvent::Saved
    } else {
        MemoryEvent::Failed
    });
    saved
}

fn carried(m: &TargetMemory, at: u64) -> TargetMemory {
    TargetMemory {
        saved_at: Some(at),
        ..m.clone()
    }
}

/// Gives a just-created algorithm the memory its target was loaded with,
/// when it is young enough and was learnt by the same algorithm under the
/// same policy.
pub(super) fn recall(
    t: &mut Managed,
    now: Duration,
    unix_secs: u64,
    observer: &dyn DecisionObserver,
) {
    let Some((m, saved_at)) = t.recall.take() else {
        return;
    };
    let elapsed = Duration::from_secs(unix_secs.saturating_sub(saved_at));
    let refused = if elapsed > OLDEST_RECALLED {
        Some(format!(
            "saved {}s ago, more than the {}s recalled",
            elapsed.as_secs(),
            OLDEST_RECALLED.as_secs()
        ))
    } else if m.algorithm != t.spec.policy.algorithm {
        Some(format!(
            "learnt by {}, the policy now names {}",
            m.algorithm, t.spec.policy.algorithm
        ))
    } else if m.policy != policy_fingerprint(&t.spec.policy) {
        Some("learnt under another policy".to_string())
    } else {
        t.algorithm
            .recall(&m.state, now, elapsed)
            .err()
            .map(|e| e.to_string())
    };
    match refused {
        None => {
            observer.memory(MemoryEvent::Recalled);
            tracing::info!(target = %t.spec.name, saved_s_ago = elapsed.as_secs(), "started from the last leader's memory");
        }
        Some(why) => {
            observer.memory(MemoryEvent::Refused);
            tracing::info!(target = %t.spec.name, why = %why, "memory not recalled: starting afresh");
        }
    }
}
