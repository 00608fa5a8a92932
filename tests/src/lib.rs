//! Harness for Herald's end-to-end tests: real Redis, NATS (JetStream) and a Mongo-compatible
//! server per test ([`services`]), a TCP proxy to cut a dependency off ([`proxy`]), a WebSocket
//! client speaking Herald's protocol ([`client`]), JWTs good and bad ([`tokens`]), floods of
//! unauthenticated connections ([`flood`]), the JS SDK as a child process ([`sdk`]) and a polling
//! wait ([`eventually`]). Starting gateways and dispatchers is left to the cluster module.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod cluster;
pub mod eventually;
pub mod fleet;
pub mod flood;
pub mod otlp;
pub mod otlp_grpc;
pub mod proxy;
pub mod sdk;
pub mod services;
pub mod test_ca;
pub mod tls_proxy;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Once;

pub use eventually::eventually;

/// Sends `tracing` output to the test's captured output, filtered by `HERALD_TEST_LOG`
/// (an `EnvFilter` directive, default `warn`). Safe to call from every test.
pub fn init_test_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        // Another subscriber may already be installed (e.g. by a test binary): keep it.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    });
}

/// A name no other test uses, e.g. `t_3f2a9c1d`: usable as a Herald prefix (a subject token),
/// a Mongo database name and a Redis key part.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..8])
}

/// Path of a workspace binary (`herald-gateway`, `herald-dispatcher`) built in the same profile
/// as the running test, for tests that need Herald as a process they can kill.
///
/// Cargo does not build the workspace's binaries for an integration test of another package,
/// hence the hint in the error.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Test executables live in `target/<profile>/deps/`; binaries one level up.
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (same profile as the tests)",
        path.display()
    );
    Ok(path)
}
