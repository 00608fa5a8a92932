//! What operators see: `/metrics` after a real message flow, and health probes that follow the
//! dependencies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use herald_proto::{close, ErrorCode, ServerFrame};
use herald_tests::client::Frame;
use herald_tests::cluster::{Cluster, Options, ADMIN_TOKEN};
use herald_tests::eventually;
use herald_tests::services::Stack;

const WAIT: Duration = Duration::from_secs(10);

/// `/metrics` of the internal listener at `addr`.
async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
}

/// The value of one sample, e.g. `herald_gateway_acks_received_total{kind="delivered"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_message_from_publish_to_receipt() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let mut alice = cluster.connect(gateway.addr, "alice").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "alice", true).await.unwrap();
    cluster.send("obs-1", &["alice"]).await.unwrap();
    cluster.publish_raw(b"not json".to_vec(), async_nats::HeaderMap::new()).await.unwrap();
    let n = alice.next_notification(WAIT).await.expect("notification");
    alice.ack([n.id.as_str()]).await.unwrap();
    cluster.wait_receipt("obs-1", "alice", "delivered").await.unwrap();

    let gw = eventually(WAIT, Duration::from_millis(50), || async {
        let text = scrape(gateway.internal).await;
        match sample(&text, "herald_publish_to_ack_seconds_count") {
            Some(count) if count >= 1.0 => Ok(text),
            _ => Err("no publish->ack sample yet"),
        }
    })
    .await
    .unwrap();
    for (series, value) in [
        ("herald_gateway_connections_open", 1.0),
        ("herald_gateway_connections_opened_total", 1.0),
        ("herald_gateway_acks_received_total{kind=\"delivered\"}", 1.0),
        ("herald_gateway_frames_in_total{kind=\"ack\"}", 1.0),
        ("herald_gateway_commands_received_total{kind=\"deliver\"}", 1.0),
        ("herald_publish_to_ack_seconds_count", 1.0),
    ] {
        assert_eq!(sample(&gw, series), Some(value), "{series} in\n{gw}");
    }
    // Sent once, live or by the connect's replay: the dispatcher lingers over the online event,
    // so its replay may find the message already stored and carry it, and the live copy is then
    // skipped as already sent.
    let once = |path_a: &str, path_b: &str| sample(&gw, path_a).unwrap_or(0.0) + sample(&gw, path_b).unwrap_or(0.0);
    let sent = once(
        "herald_gateway_notifications_sent_total{path=\"deliver\"}",
        "herald_gateway_notifications_sent_total{path=\"replay\"}",
    );
    assert_eq!(sent, 1.0, "sent once in\n{gw}");
    let timed = once(
        "herald_publish_to_deliver_seconds_count{path=\"live\"}",
        "herald_publish_to_deliver_seconds_count{path=\"replay\"}",
    );
    assert_eq!(timed, 1.0, "one publish->deliver sample in\n{gw}");
    assert!(sample(&gw, "process_resident_memory_bytes").is_some_and(|rss| rss > 0.0));

    // The malformed job may come in a batch of its own, after the message's ack is written: an
    // idle store takes each batch at once (dispatcher/src/pull.rs).
    let dsp = eventually(WAIT, Duration::from_millis(50), || async {
        let text = scrape(dispatcher.internal).await;
        let acked = sample(&text, "herald_dispatcher_receipt_writes_total{op=\"ack\"}");
        let rejected = sample(&text, "herald_dispatcher_jobs_total{outcome=\"rejected\"}");
        match (acked, rejected) {
            (Some(a), Some(r)) if a >= 1.0 && r >= 1.0 => Ok(text),
            _ => Err("no ack write or no rejection counted yet"),
        }
    })
    .await
    .unwrap();
    for (series, value) in [
        ("herald_dispatcher_jobs_total{outcome=\"stored\"}", 1.0),
        ("herald_dispatcher_jobs_total{outcome=\"rejected\"}", 1.0),
        ("herald_dispatcher_jobs_rejected_total{code=\"malformed\"}", 1.0),
        ("herald_dispatcher_receipt_writes_total{op=\"insert\"}", 1.0),
        ("herald_dispatcher_receipt_writes_total{op=\"ack\"}", 1.0),
        ("herald_dispatcher_routing_total{outcome=\"online\"}", 1.0),
    ] {
        assert_eq!(sample(&dsp, series), Some(value), "{series} in\n{dsp}");
    }
    assert!(dsp.contains("herald_dependency_seconds_bucket{dependency=\"mongodb\",op=\"insert_receipts\""));
    // Counters by label are there at zero before anything happens, so rates and alerts read 0.
    for (text, series) in [
        (&gw, "herald_gateway_connections_closed_total{reason=\"slow_consumer\"}"),
        (&gw, "herald_gateway_connect_refused_total{reason=\"gateway_full\"}"),
        (&dsp, "herald_dispatcher_jobs_total{outcome=\"dead_lettered\"}"),
        (&dsp, "herald_dispatcher_jobs_rejected_total{code=\"id_conflict\"}"),
    ] {
        assert_eq!(sample(text, series), Some(0.0), "{series} in\n{text}");
    }
    // Which build each process runs, and the lag of both streams.
    let version = env!("CARGO_PKG_VERSION");
    let gw_build = format!("herald_build_info{{service=\"herald-gateway\",version=\"{version}\"}}");
    let dsp_build = format!("herald_build_info{{service=\"herald-dispatcher\",version=\"{version}\"}}");
    assert_eq!(sample(&gw, &gw_build), Some(1.0), "{gw_build} in\n{gw}");
    assert_eq!(sample(&dsp, &dsp_build), Some(1.0), "{dsp_build} in\n{dsp}");
    assert!(sample(&dsp, "herald_jetstream_pending_events").is_some(), "herald_jetstream_pending_events in\n{dsp}");
    // Labels never carry user or message ids.
    for text in [&gw, &dsp] {
        assert!(!text.contains("alice") && !text.contains("obs-1"));
    }
}

/// The backlog gauges: what waits for an offline user, and how long the oldest has waited; back to
/// zero once a client took and acked it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_receipts_and_the_oldest_age_are_sampled() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    for id in ["backlog-1", "backlog-2", "backlog-3"] {
        cluster.send(id, &["carol"]).await.unwrap();
    }
    cluster.wait_receipt("backlog-3", "carol", "pending").await.unwrap();
    let gauges = |text: &str| {
        (sample(text, "herald_dispatcher_pending_receipts"), sample(text, "herald_dispatcher_oldest_pending_seconds"))
    };
    // Sampled every second here (HERALD_PENDING_SAMPLE_MS); the oldest has waited 2 s or more.
    eventually(WAIT, Duration::from_millis(100), || async {
        match gauges(&scrape(dispatcher.internal).await) {
            (Some(3.0), Some(age)) if age >= 2.0 => Ok(()),
            other => Err(format!("pending and oldest age: {other:?}")),
        }
    })
    .await
    .unwrap();

    let gateway = cluster.gateway().await.unwrap();
    let mut carol = cluster.connect(gateway.addr, "carol").await.unwrap();
    for _ in 0..3 {
        let n = carol.next_notification(WAIT).await.expect("replayed");
        carol.ack([n.id.as_str()]).await.unwrap();
    }
    cluster.wait_receipt("backlog-3", "carol", "delivered").await.unwrap();
    eventually(WAIT, Duration::from_millis(100), || async {
        match gauges(&scrape(dispatcher.internal).await) {
            (Some(0.0), Some(0.0)) => Ok(()),
            other => Err(format!("pending and oldest age: {other:?}")),
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_closes_are_counted_by_reason() {
    let cluster = Cluster::start().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let refused = herald_tests::client::TestClient::connect(
        &herald_tests::cluster::ws_url(gateway.addr),
        &herald_tests::tokens::expired(herald_tests::cluster::JWT_SECRET, "x"),
    )
    .await;
    assert_eq!(refused.err().and_then(|e| e.status()), Some(401));
    let mut bad = cluster.connect(gateway.addr, "bob").await.unwrap();
    bad.send_text("{not json").await.unwrap();
    let text = eventually(WAIT, Duration::from_millis(50), || async {
        let text = scrape(gateway.internal).await;
        match sample(&text, "herald_gateway_connections_closed_total{reason=\"bad_frame\"}") {
            Some(1.0) => Ok(text),
            _ => Err("close not counted yet"),
        }
    })
    .await
    .unwrap();
    assert_eq!(sample(&text, "herald_gateway_connect_refused_total{reason=\"unauthorized\"}"), Some(1.0));
    assert_eq!(sample(&text, "herald_gateway_connections_open"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_and_comes_back() {
    let mut cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let ready = |addr: SocketAddr| async move {
        let response = reqwest::get(format!("http://{addr}/readyz")).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((response.status().as_u16(), response.text().await.unwrap_or_default()))
    };
    assert_eq!(ready(gateway.internal).await.unwrap().0, 200);
    assert_eq!(ready(dispatcher.internal).await.unwrap().0, 200);

    cluster.stack.redis.stop().await;
    for addr in [gateway.internal, dispatcher.internal] {
        let (status, body) = eventually(WAIT, Duration::from_millis(100), || async {
            match ready(addr).await? {
                (503, body) => Ok((503, body)),
                other => Err(format!("still {other:?}")),
            }
        })
        .await
        .unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("\"redis\":false"), "{body}");
        // Liveness is not readiness: the process is fine.
        let live = reqwest::get(format!("http://{addr}/healthz")).await.unwrap();
        assert_eq!(live.status().as_u16(), 200);
    }

    cluster.stack.redis.restart().await.unwrap();
    for addr in [gateway.internal, dispatcher.internal] {
        eventually(Duration::from_secs(20), Duration::from_millis(100), || async {
            match ready(addr).await? {
                (200, _) => Ok(()),
                other => Err(format!("still {other:?}")),
            }
        })
        .await
        .unwrap();
    }
    let (status, _) = cluster.api(dispatcher.addr, "/v1/users/alice/presence", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(status, 200);
}

/// Issue 15: the public ports serve clients and the publish and query API, and nothing else;
/// probes, metrics and the operator's API are on the internal ports only, of both services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_and_the_operators_api_are_on_the_internal_port_only() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let gateway = cluster.gateway().await.unwrap();
    let http = reqwest::Client::new();
    let status = |method: reqwest::Method, addr: SocketAddr, path: &str| {
        let request = http.request(method, format!("http://{addr}{path}")).bearer_auth(ADMIN_TOKEN);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method as M;
    for (addr, internal) in [(gateway.addr, gateway.internal), (dispatcher.addr, dispatcher.internal)] {
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert_eq!(status(M::GET, addr, path).await, 404, "public {addr}{path}");
            assert_eq!(status(M::GET, internal, path).await, 200, "internal {internal}{path}");
        }
    }
    assert_eq!(status(M::GET, gateway.internal, "/v1/connect").await, 404, "no clients on the internal port");

    // The operator's actions: no route on the public port; served (with the token) on the
    // internal one, where an unknown user or message is their own 404.
    let (public, internal) = (dispatcher.addr, dispatcher.internal);
    let operate = [
        (M::GET, "/v1/status", (200, "")),
        (M::GET, "/v1/rejections", (200, "")),
        (M::GET, "/v1/dead-letters", (200, "")),
        (M::POST, "/v1/users/nobody/kick", (404, "not_found")),
        (M::POST, "/v1/messages/nothing/cancel", (404, "not_found")),
        (M::DELETE, "/v1/users/nobody", (200, "")),
    ];
    for (method, path, served) in operate {
        for (addr, expected) in [(public, (404, "no_route")), (internal, served)] {
            let body = (method == M::POST).then(|| b"{}".to_vec());
            let (code, _, answer) =
                cluster.request(method.clone(), addr, path, Some(ADMIN_TOKEN), &[], body).await.unwrap();
            let error = answer["error"].as_str().unwrap_or_default();
            assert_eq!((code, error), expected, "{method} {addr}{path}: {answer}");
        }
    }
    // And the other way: publishing and the query API are public only; the document is on both.
    let (code, body) = cluster.api(internal, "/v1/users/nobody/pending", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((code, body["error"].as_str()), (404, Some("no_route")), "{body}");
    assert_eq!(status(M::GET, public, "/v1/users/nobody/pending").await, 200);
    assert_eq!(status(M::POST, internal, "/v1/publish").await, 404);
    for addr in [public, internal] {
        assert_eq!(status(M::GET, addr, "/v1/openapi.json").await, 200, "{addr}");
    }
    // The listeners' own metrics are told apart.
    let text = scrape(gateway.internal).await;
    for listener in ["public", "internal"] {
        let series = format!("herald_http_connections_open{{listener=\"{listener}\"}}");
        assert!(sample(&text, &series).is_some(), "{series} missing");
    }
}

/// A stopping dispatcher closes its public port first and keeps its internal one, reporting not
/// ready (`accepting: false`), while it finishes the batch in flight; then that one closes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_dispatcher_closes_its_public_port_first_and_reports_not_ready_on_the_internal_one() {
    let cluster = Cluster::start().await.unwrap();
    let dispatcher = cluster.dispatcher().await.unwrap();
    let (public, internal) = (dispatcher.addr, dispatcher.internal);
    // A store that answers 3 s late: the job below is in flight for that long.
    cluster.stack.mongo_proxy.delay_replies(Duration::from_secs(3));
    cluster.send("in-flight", &["nobody"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    dispatcher.begin_stop();

    let body = eventually(WAIT, Duration::from_millis(20), || async {
        if reqwest::get(format!("http://{public}/v1/openapi.json")).await.is_ok() {
            return Err("the public port still answers".to_owned());
        }
        let r = reqwest::get(format!("http://{internal}/readyz")).await.map_err(|e| e.to_string())?;
        let (status, body) = (r.status().as_u16(), r.text().await.unwrap_or_default());
        if status == 503 {
            Ok(body)
        } else {
            Err(format!("internal /readyz {status}"))
        }
    })
    .await
    .expect("public port closed while the internal one reports not ready");
    assert!(body.contains("\"accepting\":false"), "{body}");

    cluster.stack.mongo_proxy.delay_replies(Duration::ZERO);
    dispatcher.stop().await.unwrap();
    assert!(reqwest::get(format!("http://{internal}/readyz")).await.is_err(), "the internal port closes last");
}

/// SIGTERM: the gateway reports not ready and refuses new clients at once, keeps its sessions
/// through the shutdown delay, then closes them with 1012 and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_is_not_ready_refuses_newcomers_then_sends_clients_elsewhere() {
    let options = Options { shutdown_delay: Duration::from_millis(1500), ..Options::default() };
    let cluster = Cluster::new(Stack::start().await.unwrap(), options).await.unwrap();
    let mut gateway = cluster.gateway_process().await.unwrap();
    let mut client = cluster.connect(gateway.addr, "carol").await.unwrap();
    let (addr, internal) = (gateway.addr, gateway.internal);
    let exited = tokio::spawn(async move { gateway.sigterm(Duration::from_secs(10)).await });

    // Not ready on the internal port while the public one still answers, with a clear refusal.
    let (status, body) = eventually(WAIT, Duration::from_millis(20), || async {
        let r = reqwest::get(format!("http://{internal}/readyz")).await.map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            503 => Ok((503, r.text().await.unwrap_or_default())),
            other => Err(format!("still {other}")),
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("\"accepting\":false"), "{body}");
    let refused = cluster.connect(addr, "dave").await.err().expect("a draining gateway refuses new clients");
    assert_eq!(refused.status(), Some(503));
    assert!(refused.to_string().contains("draining"), "{refused}");

    match client.next_frame(Duration::from_secs(10)).await {
        Frame::Server(ServerFrame::Error { code: ErrorCode::ShuttingDown, .. }) => {}
        other => panic!("expected a shutting_down error frame, got {other:?}"),
    }
    match client.next_frame(Duration::from_secs(5)).await {
        Frame::Close { code, .. } => assert_eq!(code, close::SERVICE_RESTART),
        other => panic!("expected close 1012, got {other:?}"),
    }
    assert!(exited.await.unwrap().unwrap(), "gateway exits cleanly after its drain");
}

/// A process that cannot run says why in one line (one JSON object with `HERALD_LOG_FORMAT=json`),
/// naming every bad variable, its own log settings included; and its output carries no colour
/// codes when it is not a terminal.
#[test]
fn a_fatal_start_up_error_is_one_line_and_names_what_is_wrong() {
    for binary in ["herald-gateway", "herald-dispatcher"] {
        for json in [false, true] {
            let output = std::process::Command::new(herald_tests::bin_path(binary).unwrap())
                .env_clear()
                .env("HERALD_LOG", "herald=[oops")
                .env("HERALD_LOG_FORMAT", if json { "json" } else { "text" })
                .env("HERALD_JETSTREAM_REPLICAS", "9")
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1), "{binary}: {output:?}");
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            assert!(!text.contains('\u{1b}'), "{binary}: colour codes in a pipe: {text:?}");
            let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
            assert_eq!(errors.len(), 1, "{binary}: one error line, and only that: {text}");
            let line = errors[0];
            for named in ["cannot run", "HERALD_LOG:", "HERALD_JETSTREAM_REPLICAS", "required, not set"] {
                assert!(line.contains(named), "{binary}: {named:?} missing from {line}");
            }
            if json {
                for line in text.lines() {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                    assert!(value["level"].is_string(), "{line}");
                }
            } else {
                assert!(!line.contains("Caused by") && !line.starts_with("Error:"), "{line}");
            }
        }
    }
}

/// A clean life is quiet: a dispatcher and a gateway that start, deliver a message, and stop on
/// SIGTERM (the gateway draining its client with 1012) log no WARN or ERROR on the way. An
/// operator's alert on warnings must not fire at every rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_delivery_and_sigterm_log_no_warning() {
    let cluster = Cluster::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (dsp_log, gw_log) = (dir.path().join("dispatcher.log"), dir.path().join("gateway.log"));
    let info = [("HERALD_LOG", "info")];
    let mut dispatcher = cluster.process_logging_to("herald-dispatcher", &dsp_log, &info).await.unwrap();
    let mut gateway = cluster.process_logging_to("herald-gateway", &gw_log, &info).await.unwrap();

    let mut dana = cluster.connect(gateway.addr, "dana").await.unwrap();
    cluster.wait_presence(dispatcher.addr, "dana", true).await.unwrap();
    cluster.send("quiet-1", &["dana"]).await.unwrap();
    let n = dana.next_notification(WAIT).await.expect("notification");
    dana.ack([n.id.as_str()]).await.unwrap();
    cluster.wait_receipt("quiet-1", "dana", "delivered").await.unwrap();

    assert!(gateway.sigterm(Duration::from_secs(10)).await.unwrap(), "the gateway exits with success");
    let closed = loop {
        match dana.next_frame(WAIT).await {
            Frame::Close { code, .. } => break Some(code),
            Frame::Server(_) | Frame::Text(_) | Frame::Binary(_) => {}
            _ => break None,
        }
    };
    assert_eq!(closed, Some(close::SERVICE_RESTART), "drained with 1012");
    assert!(dispatcher.sigterm(Duration::from_secs(12)).await.unwrap(), "the dispatcher exits with success");

    for (log, stopped) in [(&dsp_log, "dispatcher stopped"), (&gw_log, "gateway stopped")] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains("starting") && text.contains(stopped), "the whole life is logged:\n{text}");
        assert!(!text.contains('\x1b'), "no colours in a file, so the level reads ` WARN `:\n{text}");
        let loud: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
        assert!(loud.is_empty(), "{} logged warnings in a clean life:\n{}", log.display(), loud.join("\n"));
    }
}
