//! The control plane's store: an etcd cluster, through blocking calls on a small runtime of
//! this module's own. Coordinators campaign with etcd's election API: one leads, the others
//! stand by until its lease expires. The leader records what a standby needs to continue in
//! transactions that hold only while it still leads, so a deposed leader cannot record (and
//! so cannot commit). Workers look the leader up by the election's name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;

/// Longest a single request to etcd may take: a leader that cannot record within it stops
/// committing rather than hold every worker up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a watch may stay quiet before the keys it follows are read afresh.
const RESYNC_AFTER: Duration = Duration::from_secs(5);
/// The largest value this module writes or reads back (etcd's own request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// The election the coordinators of run `run` campaign in; its value is the leader's address.
pub fn election_key(run: &str) -> String {
    format!("holdfast/{run}/leader")
}

/// Where the leader of run `run` records what a standby needs (see
/// [`crate::coordinator::Durable`]).
pub fn durable_key(run: &str) -> String {
    format!("holdfast/{run}/durable")
}

/// Set once run `run` has finished: a coordinator that leads it afterwards has nothing to do.
pub fn finished_key(run: &str) -> String {
    format!("holdfast/{run}/finished")
}

/// Where the workers keep their leases while the coordinator whose election lease is
/// `leader_lease` leads run `run` under the run id `run_id`. A prefix of each leader and each
/// restart's own: worker ids start again with them, and a key another one's worker left
/// behind must never read as one of this coordinator's members.
pub fn members_prefix(run: &str, leader_lease: i64, run_id: u64) -> String {
    format!("holdfast/{run}/members/{leader_lease:x}-{run_id:x}/")
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {endpoints}: {message}")]
    Failed { endpoints: String, message: String },
    /// The leadership this process held is gone (its lease expired, or another leads).
    #[error("no longer the leader of {election}")]
    Deposed { election: String },
    #[error("etcd key {key}: value of {bytes} bytes is over the {MAX_VALUE_BYTES}-byte limit")]
    TooLarge { key: String, bytes: usize },
}

/// A connection to an etcd cluster (any of `endpoints` will do).
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: Vec<String>,
}

impl Etcd {
    /// Connects to `endpoints` (`host:port` or `http://host:port`).
    pub fn connect(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let described = endpoints.join(",");
        let fail = |e: &dyn std::fmt::Display| EtcdError::Failed {
            endpoints: described.clone(),
            message: e.to_string(),
        };
        if endpoints.is_empty() {
            return Err(fail(&"no endpoint given"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| fail(&e))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let client = rt
            .block_on(Client::connect(endpoints, Some(options)))
            .map_err(|e| fail(&e))?;
        let etcd = Etcd {
            rt,
            client,
            endpoints: endpoints.to_vec(),
        };
        // The connection is lazy: ask once, so a wrong address fails here, by name.
        etcd.get("holdfast/")?;
        Ok(etcd)
    }

    fn failed(&self, e: impl std::fmt::Display) -> EtcdError {
        EtcdError::Failed {
            endpoints: self.endpoints.join(","),
            message: e.to_string(),
        }
    }

    /// The value under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let resp = self
            .on_any_endpoint(|mut c| async move { c.get(key, None).await })
            .map_err(|e| self.failed(e))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        if kv.value().len() > MAX_VALUE_BYTES {
            return Err(EtcdError::TooLarge {
                key: key.into(),
                bytes: kv.value().len(),
            });
        }
        Ok(Some(kv.value().to_vec()))
    }

    /// What the current leader of `election` proclaimed (a coordinator's address), if one leads.
    pub fn leader(&self, election: &str) -> Result<Option<String>, EtcdError> {
        match self.on_any_endpoint(|mut c| async move { c.leader(election).await }) {
            Ok(resp) => Ok(resp
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// `request` on the client, tried again while etcd is unavailable (see [`retrying`]).
    fn on_any_endpoint<T, F: std::future::Future<Output = Result<T, etcd_client::Error>>>(
        &self,
        request: impl Fn(Client) -> F,
    ) -> Result<T, etcd_client::Error> {
        self.rt.block_on(retrying(|| request(self.client.clone())))
    }

    /// Follows the keys under `prefix`: those present now, then every change, in order, for as
    /// long as the [`Watch`] is kept. A watch broken by a failing member is opened again from
    /// the revision after the last one seen. One compacted away, or quiet for
    /// [`RESYNC_AFTER`] (it may be on a member cut off from the others), is replaced by reading
    /// the keys afresh and reporting what changed meanwhile, so nothing is missed for long.
    pub fn watch_prefix(&self, prefix: &str) -> Watch {
        let (tx, rx) = mpsc::unbounded_channel();
        let follower = Follower {
            client: self.client.clone(),
            prefix: prefix.to_string(),
            tx,
            present: std::collections::BTreeSet::new(),
            next_revision: None,
        };
        self.rt.spawn(follower.run());
        Watch { rx }
    }

    /// Keeps `key` = `value` under a lease of `ttl` (whole seconds, rounded up), renewed at a
    /// third of it, until the [`Registration`] is dropped (which revokes the lease: the key
    /// goes at once) or this process stops renewing it (the key goes `ttl` later).
    pub fn register(
        self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Registration, EtcdError> {
        let ttl_s = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let lease = self
            .on_any_endpoint(|mut c| async move { c.lease_grant(ttl_s, None).await })
            .map_err(|e| self.failed(e))?
            .id();
        let put = || PutOptions::new().with_lease(lease);
        if let Err(e) =
            self.on_any_endpoint(|mut c| async move { c.put(key, value, Some(put())).await })
        {
            let mut c = self.client.clone();
            let _ = self.rt.block_on(c.lease_revoke(lease));
            return Err(self.failed(e));
        }
        let renewal = self
            .rt
            .spawn(keep_renewing(self.client.clone(), lease, ttl));
        Ok(Registration {
            etcd: self,
            lease,
            renewal,
        })
    }

    /// Blocks until this process leads `election`, proclaiming `value`. Its lease lives `ttl`
    /// past the last keep-alive: that long after this process dies or is cut off from etcd, a
    /// standby leads.
    pub fn campaign(
        self,
        election: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Leadership, EtcdError> {
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = self
            .on_any_endpoint(|mut c| async move { c.lease_grant(ttl_s, None).await })
            .map_err(|e| self.failed(e))?
            .id();
        let lost = Arc::new(AtomicBool::new(false));
        let leading = Arc::new(AtomicBool::new(false));
        let renewal = Renewal {
            lease,
            ttl,
            lost: lost.clone(),
            leading: leading.clone(),
        };
        self.rt.spawn(renewal.run(self.client.clone()));
        // Campaigning waits as long as another leads: on a connection of its own, with no
        // request timeout.
        let patient = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
        let won = self.rt.block_on(async {
            let c = Client::connect(&self.endpoints, Some(patient)).await?;
            let campaign = || {
                let mut c = c.clone();
                async move { c.campaign(election, value, lease).await }
            };
            Ok::<_, etcd_client::Error>(retrying(campaign).await?.take_leader())
        });
        let key = won
            .map_err(|e| self.failed(e))?
            .ok_or_else(|| self.failed("campaign answered without a leader key"))?;
        leading.store(true, Ordering::Relaxed);
        Ok(Leadership {
            election: election.into(),
            key: key.key().to_vec(),
            revision: key.rev(),
            lease,
            lost,
            etcd: self,
        })
    }
}

/// How long a request etcd answers as unavailable is tried again: the client spreads requests
/// over the endpoints, so one that picks a dead member fails at once, and an etcd electing a
/// leader of its own fails them all for about a second.
const RETRY_UNAVAILABLE_FOR: Duration = REQUEST_TIMEOUT;
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// gRPC's UNAVAILABLE ("The service is currently unavailable"): nothing was done, so the
/// request may go again.
fn unavailable(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// `request`, sent again every [`RETRY_PAUSE`] while etcd answers it as [`unavailable`], for
/// up to [`RETRY_UNAVAILABLE_FOR`].
async fn retrying<T, F>(request: impl Fn() -> F) -> Result<T, etcd_client::Error>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let until = tokio::time::Instant::now() + RETRY_UNAVAILABLE_FOR;
    loop {
        match request().await {
            Err(e) if unavailable(&e) && tokio::time::Instant::now() + RETRY_PAUSE < until => {
                tokio::time::sleep(RETRY_PAUSE).await
            }
            answer => return answer,
        }
    }
}

/// Renews a lease at a third of its `ttl` (a failed renewal again after [`RENEW_AGAIN_AFTER`])
/// for as long as the process lives. Once `leading`, it sets `lost` for good when etcd says the
/// lease expired, or when a quarter of the `ttl` is all that can be left of it since the last
/// renewal that got through (counted from when that renewal was sent): the leader gives up
/// while etcd still holds its lease, before any standby can lead. An etcd electing a new leader
/// of its own extends every lease, so a short outage costs nothing; a renewal that hangs counts
/// as failed. Before `leading` (a standby campaigning) failures only mean trying again.
struct Renewal {
    lease: i64,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    leading: Arc<AtomicBool>,
}

impl Renewal {
    async fn run(self, mut client: Client) {
        let mut valid_until = tokio::time::Instant::now() + self.ttl;
        let mut channel = None;
        while !self.lost.load(Ordering::Relaxed) {
            let sent = tokio::time::Instant::now();
            let attempt = renew(&mut client, self.lease, &mut channel);
            let mut pause = self.ttl / 3;
            match tokio::time::timeout(self.ttl / 3, attempt).await {
                Ok(Some(left)) if left > 0 => {
                    valid_until = sent + Duration::from_secs(left.unsigned_abs())
                }
                Ok(Some(_)) if self.leading.load(Ordering::Relaxed) => {
                    self.lost.store(true, Ordering::Relaxed)
                }
                Ok(_) | Err(_) => (channel, pause) = (None, RENEW_AGAIN_AFTER),
            }
            let margin = self.ttl / 4;
            if self.leading.load(Ordering::Relaxed)
                && tokio::time::Instant::now() + margin >= valid_until
            {
                self.lost.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// How soon a renewal that failed goes again: the keep-alive stream it opens next may reach a
/// live member, and a lease cannot wait a third of its life per try.
const RENEW_AGAIN_AFTER: Duration = Duration::from_millis(100);

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// One renewal of `lease` on `channel` (opened first if need be): the seconds etcd says it
/// has left, or `None` when the renewal failed.
async fn renew(client: &mut Client, lease: i64, channel: &mut Option<KeepAlive>) -> Option<i64> {
    if channel.is_none() {
        *channel = client.lease_keep_alive(lease).await.ok();
    }
    let (keeper, stream) = channel.as_mut()?;
    keeper.keep_alive().await.ok()?;
    Some(stream.message().await.ok()??.ttl())
}

/// Renews `lease` at a third of `ttl` (a failed renewal again after [`RENEW_AGAIN_AFTER`])
/// until etcd says it is gone.
async fn keep_renewing(mut client: Client, lease: i64, ttl: Duration) {
    let mut channel = None;
    loop {
        let pause =
            match tokio::time::timeout(ttl / 3, renew(&mut client, lease, &mut channel)).await {
                Ok(Some(0)) => {
                    tracing::warn!("etcd lease {lease:x} expired");
                    return;
                }
                Ok(Some(_)) => ttl / 3,
                Ok(None) | Err(_) => {
                    channel = None;
                    RENEW_AGAIN_AFTER
                }
            };
        tokio::time::sleep(pause).await;
    }
}

/// A key kept in etcd under a lease of its own (see [`Etcd::register`]).
pub struct Registration {
    etcd: Etcd,
    lease: i64,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for Registration {
    /// Revokes the lease, so that the key goes now rather than a `ttl` later; an etcd that
    /// does not answer within a second lets it expire instead of holding the caller up.
    fn drop(&mut self) {
        self.renewal.abort();
        let (mut c, lease) = (self.etcd.client.clone(), self.lease);
        let revoke = async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(lease)).await;
        };
        self.etcd.rt.block_on(revoke);
    }
}

/// A key under a watched prefix that appeared (or changed) or went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChange {
    pub key: String,
    pub present: bool,
}

/// The changes under a prefix (see [`Etcd::watch_prefix`]); dropping it ends the watch.
pub struct Watch {
    rx: mpsc::UnboundedReceiver<KeyChange>,
}

impl Watch {
    /// The next change seen, if there is one now.
    pub fn try_next(&mut self) -> Option<KeyChange> {
        self.rx.try_recv().ok()
    }
}

/// The task behind a [`Watch`].
struct Follower {
    client: Client,
    prefix: String,
    tx: mpsc::UnboundedSender<KeyChange>,
    /// The keys reported present, to report those gone after a resync.
    present: std::collections::BTreeSet<String>,
    /// The revision to watch from; none: read the keys first.
    next_revision: Option<i64>,
}

impl Follower {
    async fn run(mut self) {
        let tx = self.tx.clone();
        tokio::select! {
            () = tx.closed() => {}
            () = async {
                loop {
                    if let Err(e) = self.follow().await {
                        tracing::warn!("watching etcd {}: {e}; again", self.prefix);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } => {}
        }
    }

    /// Reads the keys if need be, then reports changes until the watch breaks.
    async fn follow(&mut self) -> Result<(), etcd_client::Error> {
        let revision = match self.next_revision {
            Some(r) => r,
            None => self.resync().await?,
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let mut stream = self
            .client
            .watch(self.prefix.as_str(), Some(options))
            .await?;
        loop {
            // A watch on a member cut off from the others would wait in silence: after a quiet
            // spell the keys are read again, from whichever member answers.
            let Ok(message) = tokio::time::timeout(RESYNC_AFTER, stream.message()).await else {
                self.next_revision = None;
                return Ok(());
            };
            let Some(resp) = message? else {
                return Ok(());
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                self.next_revision = None;
                return Ok(());
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let present = event.event_type() == EventType::Put;
                self.report(String::from_utf8_lossy(kv.key()).into_owned(), present);
                self.next_revision = Some(kv.mod_revision() + 1);
            }
        }
    }

    /// Reads the keys under the prefix, reports what differs from what was reported, and
    /// returns the revision to watch from.
    async fn resync(&mut self) -> Result<i64, etcd_client::Error> {
        let resp = self
            .client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let now: std::collections::BTreeSet<String> = resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        let gone: Vec<String> = self.present.difference(&now).cloned().collect();
        for key in gone {
            self.report(key, false);
        }
        for key in now {
            if !self.present.contains(&key) {
                self.report(key, true);
            }
        }
        let revision = resp.header().map_or(0, |h| h.revision()) + 1;
        self.next_revision = Some(revision);
        Ok(revision)
    }

    fn report(&mut self, key: String, present: bool) {
        if present {
            self.present.insert(key.clone());
        } else {
            self.present.remove(&key);
        }
        let _ = self.tx.send(KeyChange { key, present });
    }
}

/// This process leads an election, for as long as its lease lives.
pub struct Leadership {
    etcd: Etcd,
    election: String,
    /// The election key this process created, and the revision it was created at: it is the
    /// leader exactly while that key exists with that revision.
    key: Vec<u8>,
    revision: i64,
    lease: i64,
    lost: Arc<AtomicBool>,
}

impl Leadership {
    /// Whether the lease that held the leadership is known to be gone.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Writes `key` = `value` if, and only if, this process still leads. [`EtcdError::Deposed`]
    /// when it does not.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(EtcdError::TooLarge {
                key: key.into(),
                bytes: value.len(),
            });
        }
        let deposed = || EtcdError::Deposed {
            election: self.election.clone(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.revision,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        // An etcd without a leader for a moment fails requests: tried again for as long as the
        // lease may still hold. The transaction's guard makes a late one harmless.
        loop {
            if self.lost() {
                return Err(deposed());
            }
            let mut c = self.etcd.client.clone();
            match self.etcd.rt.block_on(c.txn(txn.clone())) {
                Ok(resp) if resp.succeeded() => return Ok(()),
                Ok(_) => {
                    self.lost.store(true, Ordering::Relaxed);
                    return Err(deposed());
                }
                Err(e) => {
                    tracing::warn!("recording in etcd: {}; trying again", self.etcd.failed(e));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Leadership {
    /// The lease the leadership lives on.
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

/// A one-member etcd on loopback, for tests and local trials: started from the `etcd` binary
/// on the `PATH` in a fresh data directory, killed (and its directory removed) on drop.
pub struct LocalEtcd {
    child: std::process::Child,
    _data: tempfile::TempDir,
    pub endpoint: String,
}

/// Why no local etcd can be started here, if none can: the binary is not installed.
pub fn local_etcd_unavailable() -> Option<String> {
    let found = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    (!found).then(|| "no `etcd` binary on the PATH (Debian: apt-get install etcd-server)".into())
}

impl LocalEtcd {
    /// Starts etcd on two free loopback ports and waits (up to 10 s) until it answers.
    pub fn start() -> std::io::Result<LocalEtcd> {
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr().map(|a| a.port()))
        };
        let (client, peer) = (free_port()?, free_port()?);
        let data = tempfile::tempdir()?;
        let endpoint = format!("http://127.0.0.1:{client}");
        let child = std::process::Command::new("etcd")
            .arg("--data-dir")
            .arg(data.path())
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut etcd = LocalEtcd {
            child,
            _data: data,
            endpoint,
        };
        let started = std::time::Instant::now();
        while Etcd::connect(std::slice::from_ref(&etcd.endpoint)).is_err() {
            if started.elapsed() > Duration::from_secs(10) || etcd.child.try_wait()?.is_some() {
                return Err(std::io::Error::other("etcd did not start within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local etcd, or `None` with the reason printed when this machine has none and the
    /// environment does not require one (`HOLDFAST_REQUIRE_ETCD=1`, as CI sets).
    pub(crate) fn local_etcd_or_skip(test: &str) -> Option<LocalEtcd> {
        if let Some(why) = local_etcd_unavailable() {
            assert!(
                std::env::var_os("HOLDFAST_REQUIRE_ETCD").is_none(),
                "{test}: HOLDFAST_REQUIRE_ETCD is set but {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        Some(LocalEtcd::start().expect("starting a local etcd"))
    }

    #[test]
    fn a_standby_leads_once_the_leaders_lease_is_gone_and_the_old_leader_cannot_record() {
        let Some(etcd) = local_etcd_or_skip("etcd leadership") else {
            return;
        };
        let endpoints = vec![etcd.endpoint.clone()];
        let ttl = Duration::from_secs(2);
        let first = Etcd::connect(&endpoints)
            .unwrap()
            .campaign("holdfast/t/leader", "10.0.0.1:7070", ttl)
            .unwrap();
        first.put("holdfast/t/commit", b"round 1").unwrap();
        let observer = Etcd::connect(&endpoints).unwrap();
        assert_eq!(
            observer.leader("holdfast/t/leader").unwrap().as_deref(),
            Some("10.0.0.1:7070")
        );
        let standby = {
            let endpoints = endpoints.clone();
            std::thread::spawn(move || {
                Etcd::connect(&endpoints)
                    .unwrap()
                    .campaign("holdfast/t/leader", "10.0.0.2:7070", ttl)
                    .unwrap()
            })
        };
        // Longer than any one request may take: a campaign waits as long as another leads.
        std::thread::sleep(REQUEST_TIMEOUT + Duration::from_millis(500));
        assert!(
            !standby.is_finished(),
            "the standby must wait while the leader leads"
        );
        // What the lease's expiry does when the leader dies, at once.
        let mut c = observer.client.clone();
        observer.rt.block_on(c.lease_revoke(first.lease())).unwrap();
        let second = standby.join().unwrap();
        assert_eq!(
            observer.leader("holdfast/t/leader").unwrap().as_deref(),
            Some("10.0.0.2:7070")
        );
        assert!(matches!(
            first.put("holdfast/t/commit", b"round 2 by the old leader"),
            Err(EtcdError::Deposed { .. })
        ));
        second.put("holdfast/t/commit", b"round 2").unwrap();
        assert_eq!(
            observer.get("holdfast/t/commit").unwrap().as_deref(),
            Some(&b"round 2"[..])
        );
    }

    /// The changes `watch` reports within `within`.
    fn changes_within(watch: &mut Watch, within: Duration) -> Vec<KeyChange> {
        let until = std::time::Instant::now() + within;
        let mut seen = Vec::new();
        while std::time::Instant::now() < until {
            match watch.try_next() {
                Some(change) => seen.push(change),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        seen
    }

    fn change(key: &str, present: bool) -> KeyChange {
        KeyChange {
            key: format!("holdfast/t/members/{key}"),
            present,
        }
    }

    #[test]
    fn a_registration_lives_while_renewed_goes_when_dropped_and_a_lapsed_lease_reads_as_gone() {
        let Some(etcd) = local_etcd_or_skip("etcd registrations") else {
            return;
        };
        let endpoints = vec![etcd.endpoint.clone()];
        let register = |key: &str| {
            let etcd = Etcd::connect(&endpoints).unwrap();
            let key = format!("holdfast/t/members/{key}");
            etcd.register(&key, "w", Duration::from_secs(2)).unwrap()
        };
        let early = register("0");
        let observer = Etcd::connect(&endpoints).unwrap();
        let mut watch = observer.watch_prefix("holdfast/t/members/");
        let late = register("1");
        // Renewed, both outlive their two-second leases; the one there before the watch began
        // is reported too.
        let seen = changes_within(&mut watch, Duration::from_secs(4));
        assert_eq!(seen, [change("0", true), change("1", true)]);
        drop(late);
        assert_eq!(
            changes_within(&mut watch, Duration::from_millis(500)),
            [change("1", false)],
            "a dropped registration's key goes at once"
        );
        // A lease nobody renews: what a hung or dead worker leaves.
        let mut c = observer.client.clone();
        let lease = observer.rt.block_on(c.lease_grant(2, None)).unwrap().id();
        let put = PutOptions::new().with_lease(lease);
        let key = "holdfast/t/members/2";
        observer.rt.block_on(c.put(key, "w", Some(put))).unwrap();
        let seen = changes_within(&mut watch, Duration::from_secs(4));
        assert_eq!(seen, [change("2", true), change("2", false)]);
        drop(early);
    }

    /// An address on loopback that refuses connections: a member that died.
    fn dead_endpoint() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    /// The client spreads requests over the endpoints it was given; a dead member among them
    /// (the etcd leader killed, say) must cost retries, never a failed registration or
    /// campaign: a worker that fails to register is put out of its round.
    #[test]
    fn with_a_member_dead_registrations_campaigns_and_records_get_through() {
        let Some(etcd) = local_etcd_or_skip("etcd with a dead member") else {
            return;
        };
        let endpoints = vec![dead_endpoint(), etcd.endpoint.clone(), dead_endpoint()];
        let ttl = Duration::from_secs(2);
        for k in 0..12 {
            let key = format!("holdfast/t/members/{k}");
            let registered = Etcd::connect(&endpoints).and_then(|e| e.register(&key, "w", ttl));
            assert!(
                registered.is_ok(),
                "registration {k}: {:?}",
                registered.err()
            );
        }
        for k in 0..4 {
            let election = format!("holdfast/t{k}/leader");
            let leading = Etcd::connect(&endpoints).and_then(|e| e.campaign(&election, "a", ttl));
            let leading = leading.unwrap_or_else(|e| panic!("campaign {k}: {e}"));
            for round in 0..6 {
                let recorded = leading.put(&format!("holdfast/t{k}/commit"), b"r");
                assert!(
                    recorded.is_ok(),
                    "campaign {k}, record {round}: {recorded:?}"
                );
            }
        }
    }

    #[test]
    fn an_unreachable_etcd_is_named_in_the_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let err = Etcd::connect(std::slice::from_ref(&endpoint))
            .err()
            .expect("nothing listens there");
        assert!(err.to_string().contains(&endpoint), "{err}");
    }
}
