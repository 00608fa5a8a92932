//! The TypeScript declarations of the client protocol, for the JS SDK (`clients/js/src/protocol.ts`),
//! generated from the types in this crate by ts-rs, and the test that fails when the committed file
//! and the types differ. Test-only: ts-rs is a dev-dependency, so nothing here reaches a service.
//!
//! Regenerate with `make ts-types` (`HERALD_WRITE_TS=1 cargo test -p herald-proto typescript`).

use std::path::PathBuf;

use ts_rs::{Config, TS};

use crate::client::{ClientFrame, ErrorCode, Hello, Notification, ServerFrame, MAX_IDS_PER_FRAME};
use crate::close;
use crate::ids::{ConnectionId, GatewayId, MessageId, TopicName, MAX_MESSAGE_ID_BYTES};
use crate::topic::{TopicNotification, TopicRefusal, TopicRequest};

/// The committed file, relative to this crate.
const TARGET: &str = "../clients/js/src/protocol.ts";
const REGENERATE: &str = "make ts-types (HERALD_WRITE_TS=1 cargo test -p herald-proto typescript)";

/// Every close code in close.rs, by name. The test below also reads close.rs, so a code added
/// there but not here fails instead of going missing from the SDK.
const CLOSE_CODES: &[(&str, u16)] = &[
    ("SERVICE_RESTART", close::SERVICE_RESTART),
    ("UNSUPPORTED_DATA", close::UNSUPPORTED_DATA),
    ("MESSAGE_TOO_BIG", close::MESSAGE_TOO_BIG),
    ("BAD_FRAME", close::BAD_FRAME),
    ("TOKEN_EXPIRED", close::TOKEN_EXPIRED),
    ("HEARTBEAT_TIMEOUT", close::HEARTBEAT_TIMEOUT),
    ("SLOW_CONSUMER", close::SLOW_CONSUMER),
    ("KICKED", close::KICKED),
    ("RATE_LIMITED", close::RATE_LIMITED),
];

fn declaration<T: TS + 'static>(cfg: &Config) -> String {
    let docs = T::docs().unwrap_or_default();
    format!("{docs}export {}\n", T::decl(cfg))
}

/// The doc comment just above `pub const NAME` in close.rs, as JSDoc.
fn close_code_docs(source: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let at = lines.iter().position(|l| l.starts_with(&format!("pub const {name}: u16")))?;
    let docs: Vec<&str> = lines[..at]
        .iter()
        .rev()
        .take_while(|l| l.starts_with("///"))
        .map(|l| l.trim_start_matches("///").trim())
        .collect();
    let text = docs.into_iter().rev().collect::<Vec<_>>().join(" ");
    Some(format!("  /** {text} */\n"))
}

fn render() -> String {
    // Every integer on the wire fits a JS number (seq and *_ms are far below 2^53).
    let cfg = Config::new().with_large_int("number");
    let mut out = String::from(
        "// Generated from the Rust types in proto/src by proto/src/typescript.rs: do not edit.\n\
         // Regenerate with `make ts-types`; `make test` fails while this file and the types differ.\n\n",
    );
    for decl in [
        declaration::<MessageId>(&cfg),
        declaration::<ConnectionId>(&cfg),
        declaration::<GatewayId>(&cfg),
        declaration::<TopicName>(&cfg),
        declaration::<ErrorCode>(&cfg),
        declaration::<TopicRequest>(&cfg),
        declaration::<TopicRefusal>(&cfg),
        declaration::<Hello>(&cfg),
        declaration::<Notification>(&cfg),
        declaration::<TopicNotification>(&cfg),
        declaration::<ServerFrame>(&cfg),
        declaration::<ClientFrame>(&cfg),
    ] {
        out.push_str(&decl);
        out.push('\n');
    }
    let source = include_str!("close.rs");
    out.push_str("/** WebSocket close codes a gateway sends (proto/src/close.rs). */\nexport const CloseCode = {\n");
    for (name, code) in CLOSE_CODES {
        out.push_str(&close_code_docs(source, name).unwrap_or_default());
        out.push_str(&format!("  {name}: {code},\n"));
    }
    out.push_str("} as const;\n\n");
    out.push_str(&format!(
        "/** Longest message id, in bytes (proto/src/ids.rs). */\nexport const MAX_MESSAGE_ID_BYTES = {MAX_MESSAGE_ID_BYTES};\n\n\
         /** Most ids one `ack` or `read` frame may carry (proto/src/client.rs). */\nexport const MAX_IDS_PER_FRAME = {MAX_IDS_PER_FRAME};\n"
    ));
    out
}

#[test]
fn every_close_code_is_exported() {
    let source = include_str!("close.rs");
    let declared: Vec<&str> = source.lines().filter_map(|l| l.strip_prefix("pub const ")?.split(':').next()).collect();
    let listed: Vec<&str> = CLOSE_CODES.iter().map(|(name, _)| *name).collect();
    assert_eq!(declared, listed, "close.rs and CLOSE_CODES in typescript.rs must list the same codes");
    for (name, _) in CLOSE_CODES {
        assert!(close_code_docs(source, name).is_some_and(|d| d.len() > 10), "{name} has no doc comment");
    }
}

#[test]
fn typescript_declarations_match_the_committed_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(TARGET);
    let generated = render();
    if std::env::var_os("HERALD_WRITE_TS").is_some() {
        std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "clients/js/src/protocol.ts differs from the Rust types in proto (first at line {}: committed {:?}, \
             generated {:?}). Regenerate it with {REGENERATE}, then rebuild the SDK.",
            first + 1,
            committed.lines().nth(first).unwrap_or("<end of file>"),
            generated.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}
