//! The process's open-file limit (RLIMIT_NOFILE), and whether a service's connection limits fit
//! in it. Every socket is a file descriptor: a gateway allowed more connections than the limit
//! fails at accept with EMFILE, and takes its Redis and NATS reconnects and its health checks
//! down with it. So the limits are checked against it once, at start-up, before anything else.
//!
//! What each service needs to hold (sessions, HTTP connections, its reserve) is the caller's
//! to say; this module reads the limit and decides.

use crate::config::DEFAULT_MAX_CONNECTIONS;

/// The soft open-file limit in force after raising it as far as the hard limit allows, as
/// services commonly do (Go programs do it at start; container runtimes now often give a soft
/// limit of 1024 under a hard one of 512 Ki). `None`: unlimited, or not known on this platform.
pub fn raise_to_hard() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let limit = getrlimit(Resource::Nofile);
        if let (Some(current), maximum) = (limit.current, limit.maximum) {
            if maximum.is_none_or(|max| max > current) {
                match setrlimit(Resource::Nofile, rustix::process::Rlimit { current: maximum, maximum }) {
                    Ok(()) => tracing::info!(from = current, to = ?maximum, "raised the open-file limit"),
                    // E.g. macOS refuses an unlimited soft limit; the current one still stands.
                    Err(e) => tracing::warn!(error = %e, current, "cannot raise the open-file limit"),
                }
            }
        }
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A limit as [`raise_to_hard`] returns it, for logs.
pub fn describe(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_owned(), |limit| limit.to_string())
}

/// Sessions a gateway may hold: as configured, or the default lowered to fit the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionBudget {
    pub sessions: usize,
    /// Set when `HERALD_MAX_CONNECTIONS` was unset and the default did not fit: the default.
    pub lowered_from: Option<usize>,
}

/// Why the limits do not fit the open-file limit. Each message names the limit, what was asked,
/// and the two ways out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdLimitError {
    #[error(
        "HERALD_MAX_CONNECTIONS={sessions} needs {needed} open files ({sessions} sessions, {http} for \
         HTTP connections, {reserve} reserved for Redis, NATS and the process itself), but the \
         open-file limit (RLIMIT_NOFILE) is {limit}: raise it (ulimit -n, systemd LimitNOFILE=, the \
         container's nofile ulimit) or set HERALD_MAX_CONNECTIONS to at most {room}"
    )]
    Sessions { sessions: usize, http: usize, reserve: usize, needed: u64, limit: u64, room: u64 },
    #[error(
        "the HTTP listener needs {needed} open files ({http} for HTTP connections, from \
         HERALD_HTTP_MAX_CONNECTIONS, and {reserve} reserved for the service's own connections), \
         but the open-file limit (RLIMIT_NOFILE) is {limit}: raise it (ulimit -n, systemd \
         LimitNOFILE=, the container's nofile ulimit) or lower HERALD_HTTP_MAX_CONNECTIONS"
    )]
    Http { http: usize, reserve: usize, needed: u64, limit: u64 },
}

/// Checks that `http` descriptors for HTTP connections and `reserve` for everything else fit
/// within `limit` (`None`: unlimited), leaving at least one for a session or request. Returns
/// how many descriptors are left beyond them.
pub fn plan_http(http: usize, reserve: usize, limit: Option<u64>) -> Result<u64, FdLimitError> {
    let needed = http as u64 + reserve as u64;
    match limit {
        None => Ok(u64::MAX),
        Some(limit) if limit > needed => Ok(limit - needed),
        Some(limit) => Err(FdLimitError::Http { http, reserve, needed: needed + 1, limit }),
    }
}

/// Decides how many sessions a gateway may hold. A configured number must fit in full: an
/// operator who wrote it plans capacity by it, so a gateway that silently held fewer would
/// mislead; it refuses to start instead. The default adapts: lowered to what fits, with the
/// original kept in [`SessionBudget::lowered_from`] for a warning.
pub fn plan_sessions(
    configured: Option<usize>,
    http: usize,
    reserve: usize,
    limit: Option<u64>,
) -> Result<SessionBudget, FdLimitError> {
    let room = plan_http(http, reserve, limit)?;
    match configured {
        Some(sessions) if sessions as u64 <= room => Ok(SessionBudget { sessions, lowered_from: None }),
        Some(sessions) => Err(FdLimitError::Sessions {
            sessions,
            http,
            reserve,
            needed: sessions as u64 + http as u64 + reserve as u64,
            limit: limit.unwrap_or(u64::MAX),
            room,
        }),
        None if DEFAULT_MAX_CONNECTIONS as u64 <= room => {
            Ok(SessionBudget { sessions: DEFAULT_MAX_CONNECTIONS, lowered_from: None })
        }
        None => Ok(SessionBudget { sessions: room as usize, lowered_from: Some(DEFAULT_MAX_CONNECTIONS) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_limit_that_fits_is_kept() {
        let plan = plan_sessions(Some(10_000), 1088, 64, Some(20_000)).unwrap();
        assert_eq!(plan, SessionBudget { sessions: 10_000, lowered_from: None });
        assert_eq!(plan_sessions(Some(10_000), 1088, 64, None).unwrap().sessions, 10_000, "unlimited");
        // Exactly full is fine.
        assert_eq!(plan_sessions(Some(18_848), 1088, 64, Some(20_000)).unwrap().sessions, 18_848);
    }

    #[test]
    fn a_configured_limit_that_does_not_fit_refuses_to_start_with_the_way_out() {
        let err = plan_sessions(Some(50_000), 1088, 64, Some(20_000)).unwrap_err();
        assert_eq!(
            err,
            FdLimitError::Sessions {
                sessions: 50_000,
                http: 1088,
                reserve: 64,
                needed: 51_152,
                limit: 20_000,
                room: 18_848
            }
        );
        let text = err.to_string();
        for part in ["HERALD_MAX_CONNECTIONS=50000", "51152", "20000", "ulimit -n", "at most 18848"] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
    }

    #[test]
    fn the_default_is_lowered_to_what_fits() {
        let plan = plan_sessions(None, 1088, 64, Some(20_000)).unwrap();
        assert_eq!(plan, SessionBudget { sessions: 18_848, lowered_from: Some(DEFAULT_MAX_CONNECTIONS) });
        let plan = plan_sessions(None, 1088, 64, Some(1_048_576)).unwrap();
        assert_eq!(plan, SessionBudget { sessions: DEFAULT_MAX_CONNECTIONS, lowered_from: None });
        assert_eq!(plan_sessions(None, 1088, 64, None).unwrap().sessions, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn a_limit_too_small_for_the_http_listener_refuses_even_the_default() {
        for configured in [None, Some(1)] {
            let err = plan_sessions(configured, 1088, 64, Some(1024)).unwrap_err();
            assert!(matches!(err, FdLimitError::Http { needed: 1153, limit: 1024, .. }), "{err:?}");
            assert!(err.to_string().contains("HERALD_HTTP_MAX_CONNECTIONS"), "{err}");
        }
        // The dispatcher's check: its HTTP connections and its reserve, nothing else.
        assert_eq!(plan_http(1088, 128, Some(1217)), Ok(1));
        assert!(plan_http(1088, 128, Some(1216)).is_err(), "nothing left for a request");
    }
}
