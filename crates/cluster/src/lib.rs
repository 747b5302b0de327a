//! Membership, transport and fault-tolerant collectives for multi-worker training.
//!
//! Deliberately empty for now: the multi-worker issue fills it. It must keep building without
//! the tensor framework, working on flat `f32` buffers only, so that its decisions (quorum,
//! sync rounds) are testable without sockets or tensors.
