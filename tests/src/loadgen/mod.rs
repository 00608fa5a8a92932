//! Herald's load generator: worker processes that hold WebSocket connections and measure what
//! arrives, and an orchestrator that starts the system under test, drives load through its publish
//! path, samples the servers (RSS, CPU, Redis commands, store round trips) and writes a summary.
//!
//! Included by `src/bin/loadgen.rs`; the harness library (`herald_tests`) does not depend on it.

pub(crate) mod cost;
pub(crate) mod metrics;
pub(crate) mod mongo_proxy;
pub(crate) mod orchestrator;
pub(crate) mod protocol;
pub(crate) mod ratios;
pub(crate) mod report;
pub(crate) mod rollout;
pub(crate) mod sampler;
pub(crate) mod scenarios;
pub(crate) mod soak;
pub(crate) mod stages;
pub(crate) mod storm;
pub(crate) mod systems;
pub(crate) mod worker;
