//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! semantics: the holder renews every retry period; a candidate takes the
//! Lease only once it has seen the same record unchanged for a whole lease
//! duration (measured on its own monotonic clock, so clock skew between
//! nodes does not matter); every write carries the resourceVersion it read,
//! so of two candidates exactly one wins (the other gets 409). A leader that
//! cannot renew within the renew deadline steps down at once — before
//! another replica can take over (renew deadline < lease duration) — so two
//! leaders never overlap.
//!
//! Written on kube-rs's `Api<Lease>` rather than kube-lease-manager: that
//! crate resolves races with server-side-apply field-manager conflicts and
//! has its own duration/grace semantics; these are client-go's (15 s / 10 s
//! / 2 s), which users of the HPA and controller-runtime already know.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::control::WriteGuard;

/// Lease timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a Lease is good for without renewal.
    pub duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often a leader renews and a candidate looks.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Who leads, as this replica knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Leadership {
    /// This replica holds the Lease.
    pub leading: bool,
    /// The holder last seen (this replica's identity when leading).
    pub holder: Option<String>,
}

/// Until when this replica may write: the start of its last successful
/// renewal plus the renew deadline. The elector notices a lost Lease only
/// at its next attempt; the writer asks this right before each write, so a
/// write after the renew deadline cannot happen however long the tick took.
#[derive(Debug, Clone, Default)]
pub struct WriteLease {
    until: Arc<Mutex<Option<Instant>>>,
}

impl WriteLease {
    fn set(&self, until: Option<Instant>) {
        if let Ok(mut u) = self.until.lock() {
            *u = until;
        }
    }
}

impl WriteGuard for WriteLease {
    fn may_write(&self) -> bool {
        self.until
            .lock()
            .is_ok_and(|u| u.is_some_and(|t| Instant::now() < t))
    }
}

/// One replica's candidacy.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    write: WriteLease,
}

/// What was last read of the Lease, and when (this replica's clock).
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    at: Instant,
}

enum Attempt {
    Leading,
    Held(Option<String>),
    Failed(String),
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: LeaseTiming,
    ) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            write: WriteLease::default(),
        }
    }

    /// What the writer asks before each write.
    pub fn write_lease(&self) -> WriteLease {
        self.write.clone()
    }

    /// Runs the candidacy, publishing every change of leadership, until
    /// the receivers are gone. A leader releases the Lease when `stop`
    /// turns true, so a successor need not wait out the lease.
    pub async fn run(self, tx: watch::Sender<Leadership>, mut stop: watch::Receiver<bool>) {
        let mut observed: Option<Observed> = None;
        let mut last_renew: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout(
                self.timing.retry_period.max(Duration::from_millis(100)),
                self.try_acquire_or_renew(&mut observed),
            )
            .await
            .unwrap_or_else(|_| Attempt::Failed("no answer within the retry period".into()));
            let now = Instant::now();
            let next = match attempt {
                Attempt::Leading => {
                    last_renew = Some(now);
                    // From when the renewal was sent: the Lease may have been
                    // written at any moment of the call.
                    self.write.set(Some(started + self.timing.renew_deadline));
                    Leadership {
                        leading: true,
                        holder: Some(self.identity.clone()),
                    }
                }
                Attempt::Held(holder) => {
                    last_renew = None;
                    self.write.set(None);
                    Leadership {
                        leading: false,
                        holder,
                    }
                }
                Attempt::Failed(why) => {
                    let was = tx.borrow().clone();
                    // A leader keeps leading until its renew deadline; then
                    // it steps down, before anyone else may take over.
                    let within = last_renew
                        .is_some_and(|t| now.duration_since(t) < self.timing.renew_deadline);
                    if was.leading && !within {
                        tracing::warn!(lease = %self.name, error = %why, "lease not renewed within the renew deadline; stepping down");
                        last_renew = None;
                        self.write.set(None);
                        Leadership {
                            leading: false,
                            holder: None,
                        }
                    } else {
                        tracing::debug!(lease = %self.name, error = %why, "lease call failed");
                        was
                    }
                }
            };
            tx.send_if_modified(|l| {
                if *l != next {
                    tracing::info!(lease = %self.name, leading = next.leading, holder = ?next.holder, "leadership");
                    *l = next;
                    true
                } else {
                    false
                }
            });
            if tx.is_closed() {
                return;
            }
            let stopping = tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => false,
                // A dropped sender is a shutdown too.
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                self.write.set(None);
                let leading = tx.borrow().leading;
                tx.send_replace(Leadership::default());
                if leading {
                    self.release().await;
                }
                return;
            }
        }
    }

    fn record(&self, lease: &mut Lease, now: MicroTime, acquired: bool, transitions: i32) {
        let seconds = i32::try_from(self.timing.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now.clone());
        if acquired {
            spec.acquire_time = Some(now);
            spec.lease_transitions = Some(transitions);
        }
    }

    async fn try_acquire_or_renew(&self, observed: &mut Option<Observed>) -> Attempt {
        let now = MicroTime(Timestamp::now());
        let current = match self.api.get_opt(&self.name).await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let Some(mut lease) = current else {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: None,
            };
            self.record(&mut lease, now, true, 0);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Attempt::Leading,
                Err(kube::Error::Api(s)) if s.code == 409 => Attempt::Held(None),
                Err(e) => Attempt::Failed(e.to_string()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        // A record seen for the first time, or changed, starts its clock.
        let changed = observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew != spec.renew_time);
        if changed {
            *observed = Some(Observed {
                holder: holder.clone(),
                renew: spec.renew_time.clone(),
                at: Instant::now(),
            });
        }
        let held_for = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        );
        let expired = holder.is_none()
            || observed
                .as_ref()
                .is_some_and(|o| o.at.elapsed() >= held_for);
        if !mine && !expired {
            return Attempt::Held(holder);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let acquired = !mine;
        self.record(
            &mut lease,
            now,
            acquired,
            if acquired {
                transitions + 1
            } else {
                transitions
            },
        );
        // The resourceVersion read above makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                let spec = written.spec.unwrap_or_default();
                *observed = Some(Observed {
                    holder: spec.holder_identity,
                    renew: spec.renew_time,
                    at: Instant::now(),
                });
                Attempt::Leading
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Attempt::Held(holder),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    /// Gives the Lease up (holder cleared), so a successor takes over at
    /// its next look instead of after the lease duration.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(lease = %self.name, error = %e, "releasing the lease failed; it expires on its own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_lease_allows_writes_until_its_deadline_only() {
        let w = WriteLease::default();
        assert!(!w.may_write(), "never renewed");
        w.set(Some(Instant::now() + Duration::from_secs(3600)));
        assert!(w.may_write());
        let shared = w.clone();
        w.set(Instant::now().checked_sub(Duration::from_millis(1)));
        assert!(!shared.may_write(), "past the renew deadline");
        w.set(None);
        assert!(!shared.may_write());
    }
}
