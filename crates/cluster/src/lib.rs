//! Membership, transport and fault-tolerant collectives for multi-worker training.
//!
//! No tensor framework in here: everything works on flat `f32` buffers and opaque bytes, so
//! this crate builds and tests in seconds, and its decisions (quorum, sync rounds, votes,
//! rewinds) are pure functions testable without sockets or tensors.
//!
//! - [`wire`]: framed, authenticated TCP with bounded lengths and deadlines;
//! - [`coordinator`]: the quorum and round state machine (pure); [`server`] serves it;
//! - [`membership`]: the trait a worker sees membership through;
//! - [`etcd`]: the control plane's store: coordinator election and guarded records;
//! - [`peer`]: a worker's listener for ring neighbours and state transfer (live recovery);
//! - [`ring`]: fault-tolerant ring all-reduce;
//! - [`quant`] and [`mesh`]: block quantization, and the quantized all-reduce that uses it;
//! - [`round`]: the worker's half of the round protocol (join, rounds, two-phase sync).

pub mod acceptor;
pub mod coordinator;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fingerprint;
pub mod membership;
pub mod mesh;
pub mod pace;
pub mod peer;
pub mod quant;
pub mod ring;
pub mod round;
pub mod server;
pub mod wire;
