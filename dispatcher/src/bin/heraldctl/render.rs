//! Text for humans from the API's answers. Pure: JSON in, lines out (each ending in a newline).

use std::fmt::Write as _;

use herald_proto::Rejection;
use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn counts(v: &Value) -> String {
    let parts: Vec<String> =
        v.as_object().map(|m| m.iter().map(|(k, n)| format!("{k} {}", s(n))).collect()).unwrap_or_default();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

pub(crate) fn message(v: &Value) -> String {
    let m = &v["message"];
    let mut out = format!(
        "message {} seq={} recipients={} published_at_ms={} expires_at_ms={}\npayload {}\nreceipts: {}\n",
        s(&m["id"]),
        s(&m["seq"]),
        s(&m["recipients"]),
        s(&m["published_at_ms"]),
        s(&m["expires_at_ms"]),
        m["payload"],
        counts(&v["counts"]),
    );
    for r in v["receipts"].as_array().into_iter().flatten() {
        let at = ["delivered_at_ms", "read_at_ms", "expired_at_ms", "cancelled_at_ms"]
            .iter()
            .filter_map(|k| r.get(*k).map(|t| format!(" {k}={}", s(t))))
            .collect::<String>();
        let _ = writeln!(out, "  {:<24} {}{at}", s(&r["user"]), s(&r["state"]));
    }
    if v["truncated"] == true {
        out.push_str("  (more receipts; use --limit)\n");
    }
    out
}

pub(crate) fn pending(v: &Value) -> String {
    let mut out = format!("{}: {} pending\n", s(&v["user"]), s(&v["count"]));
    for n in v["pending"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  seq={} {} {}", s(&n["seq"]), s(&n["id"]), n["payload"]);
    }
    out
}

pub(crate) fn presence(v: &Value) -> String {
    if v["online"] != true {
        return format!("{}: offline\n", s(&v["user"]));
    }
    let gateways: Vec<String> = v["gateways"]
        .as_object()
        .map(|m| m.iter().map(|(g, n)| format!("{g}: {}", s(n))).collect())
        .unwrap_or_default();
    format!("{}: online, {} connections ({})\n", s(&v["user"]), s(&v["connections"]), gateways.join(", "))
}

pub(crate) fn kick(v: &Value) -> String {
    let gateways = v["gateways"].as_array().map(Vec::len).unwrap_or(0);
    format!("kicked {}: {} connections on {gateways} gateways asked to close\n", s(&v["user"]), s(&v["connections"]))
}

pub(crate) fn cancel(v: &Value) -> String {
    format!(
        "cancelled {}: {} pending receipts cancelled; receipts: {}\n",
        s(&v["id"]),
        s(&v["cancelled"]),
        counts(&v["counts"])
    )
}

pub(crate) fn forget(v: &Value) -> String {
    format!(
        "forgot {}: {} receipts deleted, {} of them with a message to this user alone\n",
        s(&v["user"]),
        s(&v["receipts_deleted"]),
        s(&v["messages_deleted"])
    )
}

pub(crate) fn status(v: &Value) -> String {
    let mut out = String::from("streams\n");
    for (key, st) in v["streams"].as_object().into_iter().flatten() {
        let _ =
            write!(out, "  {key:<9} {:<24} messages={} bytes={}", s(&st["name"]), s(&st["messages"]), s(&st["bytes"]));
        if let Some(c) = st.get("consumer") {
            let _ = write!(
                out,
                "  consumer {} pending={} ack_pending={} redelivered={}",
                s(&c["name"]),
                s(&c["pending"]),
                s(&c["ack_pending"]),
                s(&c["redelivered"])
            );
        }
        out.push('\n');
    }
    let gateways: Vec<String> = v["gateways"].as_array().into_iter().flatten().map(s).collect();
    let _ = writeln!(
        out,
        "gateways ({}): {}",
        gateways.len(),
        if gateways.is_empty() { "none".into() } else { gateways.join(", ") }
    );
    let deps: Vec<String> = v["dependencies"]
        .as_object()
        .map(|m| m.iter().map(|(d, ok)| format!("{d} {}", if *ok == true { "ok" } else { "FAILING" })).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "dependencies: {}", deps.join(", "));
    for e in v["errors"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "error: {}", s(e));
    }
    out
}

pub(crate) fn rejection(r: &Rejection) -> String {
    format!(
        "rejected_at_ms={} seq={} id={} code={} subject={}: {}",
        r.rejected_at_ms,
        r.stream_seq,
        r.job_id.as_deref().unwrap_or("-"),
        herald_publish::code_str(r.code),
        r.subject,
        r.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_read_as_lines() {
        let m = json!({
            "message": {"id": "o-1", "seq": 2, "payload": {"t": 1}, "published_at_ms": 1, "expires_at_ms": 9, "recipients": 2},
            "counts": {"delivered": 1, "pending": 1},
            "receipts": [{"user": "alice", "state": "delivered", "delivered_at_ms": 5}, {"user": "bob", "state": "pending"}],
            "truncated": false
        });
        let text = message(&m);
        assert!(text.starts_with("message o-1 seq=2 recipients=2"), "{text}");
        assert!(text.contains("receipts: delivered 1, pending 1"), "{text}");
        assert!(text.contains("alice") && text.contains("delivered delivered_at_ms=5"), "{text}");
        assert_eq!(presence(&json!({"user": "bob", "online": false})), "bob: offline\n");
        let online = presence(&json!({"user": "a", "online": true, "connections": 2, "gateways": {"gw-1": 2}}));
        assert_eq!(online, "a: online, 2 connections (gw-1: 2)\n");
        let st = status(&json!({
            "streams": {"jobs": {"name": "HERALD_JOBS", "messages": 0, "bytes": 0,
                "consumer": {"name": "dispatchers", "pending": 3, "ack_pending": 1, "redelivered": 0}}},
            "gateways": ["gw-1"], "dependencies": {"nats": true, "redis": false}, "errors": []
        }));
        assert!(st.contains("pending=3") && st.contains("gateways (1): gw-1") && st.contains("redis FAILING"), "{st}");
    }
}
