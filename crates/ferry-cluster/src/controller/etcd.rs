//! The journal in etcd, for several controllers: they campaign for leadership on a lease
//! and only the leader writes. A leader that dies stops renewing its lease; etcd deletes its
//! leader key after the lease's time to live and the next candidate takes over, reading the
//! journal where the dead one left it.
//!
//! Every write is a transaction that holds only while this controller's leader key still
//! exists with the revision it was elected at: a controller that lost its lease (a pause, a
//! partition) and has not noticed yet cannot write, so it cannot order a migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};

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

impl EtcdStore {
    /// Connects; `lease_ttl` seconds is how long a dead leader holds on (and so about how
    /// long a failover takes).
    pub async fn connect(
        endpoints: Vec<String>,
        prefix: String,
        id: String,
        lease_ttl: i64,
    ) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(etcd)?;
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
        let lease = self
            .client
            .lease_grant(self.lease_ttl, None)
            .await
            .map_err(etcd)?
            .id();
        let (mut keeper, mut stream) = self.client.lease_keep_alive(lease).await.map_err(etcd)?;
        let alive = Arc::new(AtomicBool::new(true));
        self.alive = alive.clone();
        let period = Duration::from_millis((self.lease_ttl as u64 * 1000) / 3);
        self.keeper = Some(tokio::spawn(async move {
            loop {
                let renewed = async {
                    keeper.keep_alive().await.ok()?;
                    let answer = stream.message().await.ok()??;
                    (answer.ttl() > 0).then_some(())
                };
                if tokio::time::timeout(period, renewed)
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                {
                    tracing::warn!("the controller's etcd lease was not renewed: leadership lost");
                    alive.store(false, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(period).await;
            }
        }));
        tracing::info!("controller {} campaigns for leadership", self.id);
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
        let answer = self
            .client
            .get(journal_key(&self.prefix), None)
            .await
            .map_err(etcd)?;
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
        let answer = self.client.txn(txn).await.map_err(etcd)?;
        if !answer.succeeded() {
            self.leader = None;
            return Err(StoreError::NotLeader);
        }
        Ok(())
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }
}
