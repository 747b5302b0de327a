//! The control plane's store: an etcd cluster, through blocking calls on a small runtime of
//! this module's own. Coordinators campaign with etcd's election API: one leads, the others
//! stand by until its lease expires. The leader records what a standby needs to continue in
//! transactions that hold only while it still leads, so a deposed leader cannot record (and
//! so cannot commit). Workers look the leader up by the election's name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};

/// Longest a single request to etcd may take: a leader that cannot record within it stops
/// committing rather than hold every worker up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
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

    /// `request` on the client, tried once more per endpoint while it fails: requests take
    /// turns among the endpoints, and a dead member fails the ones that reach it.
    fn on_any_endpoint<T, F: std::future::Future<Output = Result<T, etcd_client::Error>>>(
        &self,
        request: impl Fn(Client) -> F,
    ) -> Result<T, etcd_client::Error> {
        let mut answer = self.rt.block_on(request(self.client.clone()));
        for _ in 0..self.endpoints.len() {
            match &answer {
                // gRPC's UNAVAILABLE: "The service is currently unavailable".
                Err(e) if e.to_string().contains("currently unavailable") => {
                    answer = self.rt.block_on(request(self.client.clone()))
                }
                _ => break,
            }
        }
        answer
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
        let mut c = self.client.clone();
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = self
            .rt
            .block_on(c.lease_grant(ttl_s, None))
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
            let mut c = Client::connect(&self.endpoints, Some(patient)).await?;
            let mut resp = c.campaign(election, value, lease).await?;
            Ok::<_, etcd_client::Error>(resp.take_leader())
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

/// Renews a lease at a third of its `ttl`, for as long as the process lives. Once `leading`,
/// it sets `lost` for good when etcd says the lease expired, or when a quarter of the `ttl`
/// is all that can be left of it since the last renewal that got through (counted from when
/// that renewal was sent): the leader gives up while etcd still holds its lease, before any
/// standby can lead. An etcd electing a new leader of its own extends every lease, so a short
/// outage costs nothing; a renewal that hangs counts as failed. Before `leading` (a standby
/// campaigning) failures only mean trying again.
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
            match tokio::time::timeout(self.ttl / 3, attempt).await {
                Ok(Some(left)) if left > 0 => {
                    valid_until = sent + Duration::from_secs(left.unsigned_abs())
                }
                Ok(Some(_)) if self.leading.load(Ordering::Relaxed) => {
                    self.lost.store(true, Ordering::Relaxed)
                }
                Ok(_) | Err(_) => channel = None,
            }
            let margin = self.ttl / 4;
            if self.leading.load(Ordering::Relaxed)
                && tokio::time::Instant::now() + margin >= valid_until
            {
                self.lost.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(self.ttl / 3).await;
        }
    }
}

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
