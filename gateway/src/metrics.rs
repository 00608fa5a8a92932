//! The gateway's Prometheus metrics. Labels carry reasons and kinds, never user or message ids.

use herald_shared::metrics::{
    self as m, DependencyMetrics, MetricsError, BATCH_BUCKETS, DELIVERY_BUCKETS, LATENCY_BUCKETS,
};
use herald_shared::serve::ServeMetrics;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

/// `herald_publish_to_deliver_seconds`, one histogram per path.
pub(crate) struct DeliveryLatency {
    pub(crate) live: Histogram,
    pub(crate) replay: Histogram,
    pub(crate) resend: Histogram,
}

impl DeliveryLatency {
    fn new(vec: HistogramVec) -> Self {
        let path = |p: &str| vec.with_label_values(&[p]);
        Self { live: path("live"), replay: path("replay"), resend: path("resend") }
    }
}

pub(crate) struct GatewayMetrics {
    pub(crate) registry: Registry,
    pub(crate) connections_open: IntGauge,
    pub(crate) connections_opened: IntCounter,
    /// By close reason (`client_gone`, `slow_consumer`, `bad_frame`, `shutdown`, ...).
    pub(crate) connections_closed: IntCounterVec,
    /// By reason (`unauthorized`, `keys_unavailable`, `origin`, `gateway_full`, `user_limit`,
    /// `draining`).
    pub(crate) connect_refused: IntCounterVec,
    /// Client frames by kind (`ack`, `read`, `refresh`, `control`, `invalid`).
    pub(crate) frames_in: IntCounterVec,
    /// Fetches of the identity provider's JWKS, by result (`ok`, `error`).
    pub(crate) jwks_fetches: IntCounterVec,
    /// Changes of the TLS certificate files, by result (`loaded`, `failed`: the old pair serves on).
    pub(crate) tls_reloads: IntCounterVec,
    /// Frames written to sockets.
    pub(crate) frames_out: IntCounter,
    /// Notifications written to sockets, by path (`deliver`, `replay`).
    pub(crate) notifications_sent: IntCounterVec,
    pub(crate) notifications_expired: IntCounter,
    /// Topic messages read from the topics stream.
    pub(crate) topic_messages: IntCounter,
    /// Topic messages queued for a subscriber (one per subscriber and message).
    pub(crate) topic_fan_out: IntCounter,
    /// Subscribe requests, by outcome (`subscribed`, `recovered`, `not_recovered`, `refused`).
    pub(crate) topic_subscribes: IntCounterVec,
    /// Second copies not written: the connection was sent the notification already.
    pub(crate) notifications_repeated: IntCounter,
    pub(crate) queue_overflows: IntCounter,
    /// Message ids acknowledged by clients, by kind (`delivered`, `read`).
    pub(crate) acks_received: IntCounterVec,
    /// Acked or read ids not passed on: not sent to that connection, or acked before.
    pub(crate) acks_ignored: IntCounter,
    pub(crate) ack_batch_size: Histogram,
    pub(crate) commands_received: IntCounterVec,
    /// Next replay pages asked for, by kind (`next`, `retry`: asked again, the page had not come).
    pub(crate) replay_requests: IntCounterVec,
    pub(crate) presence_resyncs: IntCounter,
    pub(crate) presence_healed: IntCounter,
    /// By path: `live` (routed as published), `replay` (pending when its user connected),
    /// `resend` (sent again after the ack timeout). Held per path, so that writing a frame
    /// looks no label up.
    pub(crate) publish_to_deliver: DeliveryLatency,
    pub(crate) publish_to_ack: Histogram,
    pub(crate) dependencies: DependencyMetrics,
    /// The public HTTP listener's (`herald_http_*{listener="public"}`).
    pub(crate) http: ServeMetrics,
    /// The internal listener's (`herald_http_*{listener="internal"}`).
    pub(crate) internal_http: ServeMetrics,
}

impl GatewayMetrics {
    pub(crate) fn new() -> Result<Self, MetricsError> {
        let r = m::registry("herald-gateway");
        Ok(Self {
            connections_open: m::gauge(&r, "herald_gateway_connections_open", "Open client connections")?,
            connections_opened: m::counter(&r, "herald_gateway_connections_opened_total", "Connections accepted")?,
            connections_closed: m::counter_vec_at_zero(
                &r,
                "herald_gateway_connections_closed_total",
                "Connections ended, by reason",
                "reason",
                &crate::session::close_reasons(),
            )?,
            connect_refused: m::counter_vec_at_zero(
                &r,
                "herald_gateway_connect_refused_total",
                "Connect requests refused before the upgrade, by reason",
                "reason",
                &["unauthorized", "keys_unavailable", "origin", "user_limit", "gateway_full", "draining"],
            )?,
            frames_in: m::counter_vec_at_zero(
                &r,
                "herald_gateway_frames_in_total",
                "Frames from clients, by kind",
                "kind",
                &["ack", "read", "refresh", "subscribe", "unsubscribe", "control", "invalid"],
            )?,
            jwks_fetches: m::counter_vec_at_zero(
                &r,
                "herald_gateway_jwks_fetches_total",
                "Fetches of the identity provider's JWKS (HERALD_JWKS_URL), by result",
                "result",
                &["ok", "error"],
            )?,
            tls_reloads: m::counter_vec_at_zero(
                &r,
                "herald_gateway_tls_reloads_total",
                "Changes of HERALD_TLS_CERT_FILE / HERALD_TLS_KEY_FILE, by result (failed: still serving the previous pair)",
                "result",
                &[herald_shared::serve::certs::RELOADED, herald_shared::serve::certs::RELOAD_FAILED],
            )?,
            frames_out: m::counter(&r, "herald_gateway_frames_out_total", "Frames written to client sockets")?,
            notifications_sent: m::counter_vec_at_zero(
                &r,
                "herald_gateway_notifications_sent_total",
                "Notifications written to client sockets, by path",
                "path",
                &["deliver", "replay"],
            )?,
            topic_messages: m::counter(
                &r,
                "herald_gateway_topic_messages_total",
                "Topic messages read from the topics stream",
            )?,
            topic_fan_out: m::counter(
                &r,
                "herald_gateway_topic_fan_out_total",
                "Topic messages queued for a subscriber, one per subscriber and message",
            )?,
            topic_subscribes: m::counter_vec_at_zero(
                &r,
                "herald_gateway_topic_subscribes_total",
                "Subscribe requests, by outcome",
                "outcome",
                &["subscribed", "recovered", "not_recovered", "refused"],
            )?,
            notifications_expired: m::counter(
                &r,
                "herald_gateway_notifications_expired_total",
                "Notifications not delivered because their TTL had passed",
            )?,
            notifications_repeated: m::counter(
                &r,
                "herald_gateway_notifications_repeated_total",
                "Notifications not written because the connection was sent them already and no resend asked for them",
            )?,
            acks_ignored: m::counter(
                &r,
                "herald_gateway_acks_ignored_total",
                "Acked or read ids not passed on: never sent to that connection, or acked already",
            )?,
            queue_overflows: m::counter(
                &r,
                "herald_gateway_queue_overflows_total",
                "Connections closed because their outbound queue was full",
            )?,
            acks_received: m::counter_vec_at_zero(
                &r,
                "herald_gateway_acks_received_total",
                "Message ids acknowledged by clients, by kind",
                "kind",
                &["delivered", "read"],
            )?,
            ack_batch_size: m::histogram(
                &r,
                "herald_gateway_ack_batch_size",
                "Ack records per message on the events stream",
                BATCH_BUCKETS,
            )?,
            commands_received: m::counter_vec_at_zero(
                &r,
                "herald_gateway_commands_received_total",
                "Commands from dispatchers, by kind (deliver, replay, kick, invalid)",
                "kind",
                &["deliver", "replay", "kick", "invalid"],
            )?,
            replay_requests: m::counter_vec_at_zero(
                &r,
                "herald_gateway_replay_requests_total",
                "Next pages of connections' replays asked for, by kind (next, retry)",
                "kind",
                &["next", "retry"],
            )?,
            presence_resyncs: m::counter(
                &r,
                "herald_gateway_presence_resyncs_total",
                "Heartbeats that found presence missing in Redis and wrote connections again",
            )?,
            presence_healed: m::counter(
                &r,
                "herald_gateway_presence_healed_total",
                "Connections that Redis had lost, registered again and announced",
            )?,
            publish_to_deliver: DeliveryLatency::new(m::histogram_vec(
                &r,
                "herald_publish_to_deliver_seconds",
                "From a job's publish time to its notification written to a client socket, by path",
                &["path"],
                DELIVERY_BUCKETS,
            )?),
            publish_to_ack: m::histogram(
                &r,
                "herald_publish_to_ack_seconds",
                "From a job's publish time to the client's ack reaching the gateway",
                LATENCY_BUCKETS,
            )?,
            dependencies: DependencyMetrics::new(&r)?,
            http: ServeMetrics::new(&r, "public")?,
            internal_http: ServeMetrics::new(&r, "internal")?,
            registry: r,
        })
    }
}
