//! What a worker needs from membership, as a trait: a request/reply channel to whatever decides
//! quorums and rounds. Today that is the embedded coordinator over TCP
//! ([`CoordinatorConnector`]); an etcd-backed implementation (leases for liveness, transactions
//! for rounds) can replace it without touching the worker, so that the coordinator need not
//! stay a single point of failure.

use std::net::IpAddr;
use std::time::Duration;

use crate::coordinator::{Reply, Request};
use crate::server::CoordinatorClient;
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
}
