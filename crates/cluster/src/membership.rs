//! What a worker needs from membership, as a trait: a request/reply channel to whatever decides
//! quorums and rounds, and a way to show it lives. [`CoordinatorConnector`] reaches a
//! coordinator at a fixed address, and the worker heartbeats to it; [`EtcdConnector`] (feature
//! `etcd`) finds whichever coordinator leads the run in etcd, and the worker keeps an etcd
//! lease alive that the leader watches.

use std::net::IpAddr;
use std::time::Duration;

#[cfg(feature = "etcd")]
use crate::coordinator::MemberLease;
use crate::coordinator::{Reply, Request};
use crate::server::CoordinatorClient;
#[cfg(feature = "etcd")]
use crate::server::LeaseChanges;
use crate::wire::{Auth, WireError};

/// One channel to the membership service. A worker holds two: one for its requests, one
/// for heartbeats.
pub trait Membership: Send {
    /// The run this service coordinates.
    fn run_id(&self) -> u64;
    /// The local address this channel leaves from: the interface to advertise to peers.
    fn local_ip(&self) -> Option<IpAddr>;
    fn call(&mut self, req: &Request) -> Result<Reply, WireError>;
}

/// Opens channels to a membership service.
pub trait MembershipConnector: Send + Sync {
    /// Where the service is, for messages.
    fn describe(&self) -> String;
    /// `run_id` 0 accepts whichever run the service runs.
    fn connect(&self, run_id: u64) -> Result<Box<dyn Membership>, WireError>;

    /// Keeps `key` = `value` under a lease of `ttl` until the returned guard is dropped
    /// ([`crate::coordinator::Liveness::Lease`]). Only a service with a control plane has
    /// leases; the others refuse.
    fn register(&self, key: &str, value: &str, ttl: Duration) -> Result<Box<dyn Send>, WireError> {
        let _ = (key, value, ttl);
        Err(WireError::Refused {
            peer: self.describe(),
            why: "it judges liveness by etcd leases; join it through etcd (worker --etcd ENDPOINTS --run NAME)".into(),
        })
    }
}

impl Membership for CoordinatorClient {
    fn run_id(&self) -> u64 {
        CoordinatorClient::run_id(self)
    }

    fn local_ip(&self) -> Option<IpAddr> {
        CoordinatorClient::local_ip(self)
    }

    fn call(&mut self, req: &Request) -> Result<Reply, WireError> {
        CoordinatorClient::call(self, req)
    }
}

/// The embedded coordinator (`holdfast coordinator`, or `train --workers`) at `addr`.
#[derive(Clone, Debug)]
pub struct CoordinatorConnector {
    pub addr: String,
    pub auth: Auth,
    pub timeout: Duration,
}

impl MembershipConnector for CoordinatorConnector {
    fn describe(&self) -> String {
        format!("coordinator {}", self.addr)
    }

    fn connect(&self, run_id: u64) -> Result<Box<dyn Membership>, WireError> {
        let c = CoordinatorClient::connect(&self.addr, &self.auth, run_id, self.timeout)?;
        Ok(Box::new(c))
    }
}

#[cfg(feature = "etcd")]
/// Whichever coordinator leads run `run` in an etcd cluster (see [`crate::etcd`]): looked up
/// at every connection, so a worker that lost its coordinator finds the one that took over.
#[derive(Clone, Debug)]
pub struct EtcdConnector {
    pub endpoints: Vec<String>,
    pub run: String,
    pub auth: Auth,
    pub timeout: Duration,
}

#[cfg(feature = "etcd")]
impl EtcdConnector {
    /// The leader's address: no leader yet reads as a refused connection, which the join
    /// retries for a while, like a coordinator that is still starting.
    fn leader(&self) -> Result<String, WireError> {
        let io = |kind: std::io::ErrorKind, message: String| WireError::Io {
            peer: self.describe(),
            source: std::io::Error::new(kind, message),
        };
        let etcd = crate::etcd::Etcd::connect(&self.endpoints)
            .map_err(|e| io(std::io::ErrorKind::ConnectionRefused, e.to_string()))?;
        let election = crate::etcd::election_key(&self.run);
        match etcd.leader(&election) {
            Ok(Some(addr)) => Ok(addr),
            Ok(None) => Err(io(
                std::io::ErrorKind::ConnectionRefused,
                "no coordinator leads it yet".into(),
            )),
            Err(e) => Err(io(std::io::ErrorKind::ConnectionRefused, e.to_string())),
        }
    }
}

#[cfg(feature = "etcd")]
impl MembershipConnector for EtcdConnector {
    fn describe(&self) -> String {
        format!(
            "the coordinator leading run {} in etcd {}",
            self.run,
            self.endpoints.join(",")
        )
    }

    fn connect(&self, run_id: u64) -> Result<Box<dyn Membership>, WireError> {
        let addr = self.leader()?;
        let c = CoordinatorClient::connect(&addr, &self.auth, run_id, self.timeout)?;
        Ok(Box::new(c))
    }

    fn register(&self, key: &str, value: &str, ttl: Duration) -> Result<Box<dyn Send>, WireError> {
        let failed = |e: crate::etcd::EtcdError| WireError::Io {
            peer: self.describe(),
            source: std::io::Error::other(e.to_string()),
        };
        let etcd = crate::etcd::Etcd::connect(&self.endpoints).map_err(failed)?;
        Ok(Box::new(etcd.register(key, value, ttl).map_err(failed)?))
    }
}

#[cfg(feature = "etcd")]
/// The lease changes of the workers under `prefix` (see [`crate::etcd::members_prefix`]),
/// as the coordinator's server polls them. A key that does not end in a worker id is not a
/// worker's, and is skipped.
pub fn member_leases(mut watch: crate::etcd::Watch, prefix: String) -> LeaseChanges {
    Box::new(move || {
        loop {
            let change = watch.try_next()?;
            let id = change
                .key
                .strip_prefix(&prefix)
                .and_then(|id| id.parse().ok());
            if let Some(worker) = id {
                let alive = change.present;
                return Some(MemberLease { worker, alive });
            }
            tracing::warn!("etcd key {} is not a worker's lease; skipped", change.key);
        }
    })
}
