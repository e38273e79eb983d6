//! The journal in etcd, for several controllers: they campaign for leadership on a lease
//! and only the leader writes. A leader that dies stops renewing its lease; etcd deletes its
//! leader key after the lease's time to live and the next candidate takes over, reading the
//! journal where the dead one left it.
//!
//! Every write is a transaction that holds only while this controller's leader key still
//! exists with the revision it was elected at: a controller that lost its lease (a pause, a
//! partition) and has not noticed yet cannot write, so it cannot order a migration.
//!
//! A standby's campaign waits as long as the leader lives: it has no time limit (the
//! connection's HTTP/2 pings notice a dead etcd), unlike every other request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, Txn, TxnOp,
};

use super::journal::Journal;
use super::store::StoreError;

/// The election's name and the journal's key, under a cluster prefix.
fn election_key(prefix: &str) -> String {
    format!("{prefix}/controller/leader")
}
fn journal_key(prefix: &str) -> String {
    format!("{prefix}/controller/journal")
}

/// A controller's seat in etcd.
pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    /// This controller's name, the value it campaigns with.
    id: String,
    lease_ttl: i64,
    client: Client,
    /// The leader key once elected: (key, revision).
    leader: Option<(Vec<u8>, i64)>,
    /// Cleared by the keep-alive task when the lease is lost.
    alive: Arc<AtomicBool>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn etcd(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

/// How long one request to etcd may take, the campaign excepted.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection's settings: no time limit on requests, which would end a standby's
/// campaign (a request that waits for the leader to go) after that limit; each other
/// request gets one of its own ([`within`]).
fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
}

/// `request`, given up after [`REQUEST_TIMEOUT`].
async fn within<T>(
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(answer) => answer.map_err(etcd),
        Err(_) => Err(StoreError::Etcd(format!(
            "{what}: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

impl EtcdStore {
    /// Connects; `lease_ttl` seconds is how long a dead leader holds on (and so about how
    /// long a failover takes).
    pub async fn connect(
        endpoints: Vec<String>,
        prefix: String,
        id: String,
        lease_ttl: i64,
    ) -> Result<EtcdStore, StoreError> {
        let client = within(
            "connect",
            Client::connect(&endpoints, Some(connect_options())),
        )
        .await?;
        Ok(EtcdStore {
            endpoints,
            prefix,
            id,
            lease_ttl: lease_ttl.max(2),
            client,
            leader: None,
            alive: Arc::new(AtomicBool::new(false)),
            keeper: None,
        })
    }

    pub fn describe(&self) -> String {
        format!("etcd {} ({})", self.endpoints.join(","), self.prefix)
    }

    /// Campaigns until elected.
    pub async fn lead(&mut self) -> Result<(), StoreError> {
        if self.leads() {
            return Ok(());
        }
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        let ttl = Duration::from_secs(self.lease_ttl as u64);
        let asked = Instant::now();
        let lease = within("lease grant", self.client.lease_grant(self.lease_ttl, None))
            .await?
            .id();
        let link = within("lease keep-alive", self.client.lease_keep_alive(lease)).await?;
        let alive = Arc::new(AtomicBool::new(true));
        self.alive = alive.clone();
        let clock = LeaseClock::granted(asked, ttl);
        self.keeper = Some(tokio::spawn(keep_alive(
            self.client.clone(),
            lease,
            link,
            clock,
            alive,
        )));
        tracing::info!("controller {} campaigns for leadership", self.id);
        // No time limit: it answers when this controller is elected.
        let won = self
            .client
            .campaign(election_key(&self.prefix), self.id.clone(), lease)
            .await
            .map_err(etcd)?;
        let key = won
            .leader()
            .ok_or_else(|| StoreError::Etcd("the election answered without a key".into()))?;
        self.leader = Some((key.key().to_vec(), key.rev()));
        tracing::info!("controller {} leads", self.id);
        Ok(())
    }

    pub fn leads(&self) -> bool {
        self.leader.is_some() && self.alive.load(Ordering::SeqCst)
    }

    pub async fn load(&mut self) -> Result<Journal, StoreError> {
        let answer = within(
            "journal read",
            self.client.get(journal_key(&self.prefix), None),
        )
        .await?;
        match answer.kvs().first() {
            None => Ok(Journal::default()),
            Some(kv) => serde_json::from_slice(kv.value()).map_err(|e| StoreError::Damaged {
                path: journal_key(&self.prefix).into(),
                reason: e.to_string(),
            }),
        }
    }

    pub async fn save(&mut self, journal: &Journal) -> Result<(), StoreError> {
        let Some((key, rev)) = self.leader.clone().filter(|_| self.leads()) else {
            return Err(StoreError::NotLeader);
        };
        let bytes = serde_json::to_vec(journal).map_err(|e| StoreError::Etcd(e.to_string()))?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, rev)])
            .and_then(vec![TxnOp::put(journal_key(&self.prefix), bytes, None)]);
        let answer = within("journal write", self.client.txn(txn)).await?;
        if !answer.succeeded() {
            self.leader = None;
            return Err(StoreError::NotLeader);
        }
        Ok(())
    }
}

/// Until when a lease surely holds, as its holder can tell: etcd counts its time to live
/// from when it handles a grant or a renewal, which is after the holder asked for it, so
/// the holder counts from its asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseClock {
    ttl: Duration,
    valid_until: Instant,
}

impl LeaseClock {
    /// A lease of `ttl` asked for at `asked`.
    fn granted(asked: Instant, ttl: Duration) -> LeaseClock {
        LeaseClock {
            ttl,
            valid_until: asked + ttl,
        }
    }

    /// A renewal asked for at `asked` was answered: `ttl_secs` more (0 or less: etcd no
    /// longer has the lease). Returns whether the lease still holds. A late answer extends
    /// the lease all the same: it is the asking that counts.
    fn renewed(&mut self, asked: Instant, ttl_secs: i64) -> bool {
        if ttl_secs <= 0 {
            self.valid_until = self.valid_until.min(asked);
            return false;
        }
        let until = asked + Duration::from_secs(ttl_secs as u64);
        self.valid_until = self.valid_until.max(until);
        true
    }

    /// Whether the lease surely holds at `now`.
    fn holds(&self, now: Instant) -> bool {
        now < self.valid_until
    }

    /// How long a renewal may take before another is tried (on a new stream), and how long
    /// to wait between renewals: a third of the time to live, so two may fail in a row.
    fn period(&self) -> Duration {
        self.ttl / 3
    }
}

/// Renews `lease` until its holder can no longer tell it holds: a renewal that fails or is
/// slow is tried again (on a new stream) while the lease's time to live lasts, and only
/// then, or when etcd says the lease is gone, is leadership given up (`alive` cleared).
async fn keep_alive(
    mut client: Client,
    lease: i64,
    link: (LeaseKeeper, LeaseKeepAliveStream),
    mut clock: LeaseClock,
    alive: Arc<AtomicBool>,
) {
    let mut link = Some(link);
    loop {
        let asked = Instant::now();
        if !clock.holds(asked) {
            tracing::warn!("the controller's etcd lease was not renewed in time: leadership lost");
            break;
        }
        let attempt = async {
            if link.is_none() {
                link = client.lease_keep_alive(lease).await.ok();
            }
            let (keeper, stream) = link.as_mut()?;
            keeper.keep_alive().await.ok()?;
            Some(stream.message().await.ok()??.ttl())
        };
        let wait = clock
            .period()
            .min(clock.valid_until.saturating_duration_since(asked));
        match tokio::time::timeout(wait, attempt).await {
            Ok(Some(ttl)) => {
                if !clock.renewed(asked, ttl) {
                    tracing::warn!("etcd no longer has the controller's lease: leadership lost");
                    break;
                }
                tokio::time::sleep(clock.period()).await;
            }
            _ => {
                // Its answer, if it comes, must not be taken for the next one's.
                link = None;
                tracing::debug!("an etcd lease renewal failed or was slow; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    alive.store(false, Ordering::SeqCst);
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_renewal_keeps_the_lease_while_its_time_to_live_lasts() {
        let t0 = Instant::now();
        let secs = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut clock = LeaseClock::granted(t0, Duration::from_secs(2));
        assert!(clock.holds(secs(1.9)));
        assert!(!clock.holds(secs(2.0)));
        // Asked at 0.7, answered at 1.5 (more than a renewal period later): the lease
        // holds, counted from the asking.
        assert!(clock.renewed(secs(0.7), 2));
        assert!(clock.holds(secs(2.6)));
        assert!(!clock.holds(secs(2.7)));
        // An answer to an older question does not shorten it.
        assert!(clock.renewed(secs(0.1), 2));
        assert!(clock.holds(secs(2.6)));
        assert_eq!(clock.period(), Duration::from_secs(2) / 3);
    }

    #[test]
    fn a_lease_etcd_no_longer_has_is_lost_at_once() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::granted(t0, Duration::from_secs(2));
        let asked = t0 + Duration::from_millis(700);
        assert!(!clock.renewed(asked, 0));
        assert!(!clock.holds(asked));
    }
}
