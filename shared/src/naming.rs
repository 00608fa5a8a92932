//! The one place where Redis keys, NATS subjects, JetStream streams and consumers, and Mongo
//! collections get their names. Everything is under a configurable prefix.

/// Names for one Herald deployment (one prefix).
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    stream_prefix: String,
}

/// Mongo collections (the database itself is configured).
pub mod collections {
    /// One document per message: payload, sequence, expiry.
    pub const MESSAGES: &str = "messages";
    /// One document per (message, recipient): the receipt and inbox entry.
    pub const RECEIPTS: &str = "receipts";
    /// Jobs that kept failing, with their reason.
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// One document per topic message: its topic, offset and aggregate receipt (acks counted).
    pub const TOPIC_MESSAGES: &str = "topic_messages";
}

impl Names {
    /// `prefix` must be a valid subject token (checked by the config).
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), stream_prefix: prefix.to_ascii_uppercase().replace('-', "_") }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // --- JetStream: publish jobs -------------------------------------------------------------

    /// Stream holding publish jobs until a dispatcher has stored them.
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.stream_prefix)
    }

    /// Publishers publish jobs on any subject under this (e.g. `herald.publish.orders`).
    pub fn jobs_subjects(&self) -> String {
        format!("{}.publish.>", self.prefix)
    }

    /// A subject to publish jobs on: `suffix` is the publisher's own label (for monitoring), not
    /// a topic. A topic job names its topic in its body (`topic`), on any such subject.
    pub fn publish_subject(&self, suffix: &str) -> String {
        format!("{}.publish.{suffix}", self.prefix)
    }

    /// Durable pull consumer shared by all dispatchers.
    pub fn jobs_consumer(&self) -> &'static str {
        "dispatchers"
    }

    // --- JetStream: events from gateways -----------------------------------------------------

    /// Stream holding client acks, online announcements and replay page requests until a
    /// dispatcher has applied them.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }

    pub fn events_subjects(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    pub fn ack_events_subject(&self, gateway_id: &str) -> String {
        format!("{}.events.ack.{gateway_id}", self.prefix)
    }

    pub fn online_events_subject(&self, gateway_id: &str) -> String {
        format!("{}.events.online.{gateway_id}", self.prefix)
    }

    /// Where a gateway asks for the next page of a connection's replay.
    pub fn more_events_subject(&self, gateway_id: &str) -> String {
        format!("{}.events.more.{gateway_id}", self.prefix)
    }

    pub fn events_consumer(&self) -> &'static str {
        "dispatchers"
    }

    /// Where a gateway reports the acks of topic messages, counted ([`herald_proto::Event::TopicAcks`]).
    pub fn topic_ack_events_subject(&self, gateway_id: &str) -> String {
        format!("{}.events.topic_ack.{gateway_id}", self.prefix)
    }

    // --- JetStream: topics --------------------------------------------------------------------

    /// Stream of topic messages, kept within the configured retention for recovery; its
    /// sequence is a topic message's offset.
    pub fn topics_stream(&self) -> String {
        format!("{}_TOPICS", self.stream_prefix)
    }

    pub fn topics_subjects(&self) -> String {
        format!("{}.topic.>", self.prefix)
    }

    /// The subject of one topic's messages. A topic name is dot-separated subject tokens, so
    /// this is a literal subject (no wildcard, no empty token).
    pub fn topic_subject(&self, topic: &herald_proto::TopicName) -> String {
        format!("{}.topic.{topic}", self.prefix)
    }

    // --- JetStream: what publishers read back -------------------------------------------------

    /// Stream keeping rejections and dead letters for a week, for publishers to inspect.
    pub fn rejected_stream(&self) -> String {
        format!("{}_REJECTED", self.stream_prefix)
    }

    /// Where a job that fails validation is reported.
    pub fn rejected_subject(&self) -> String {
        format!("{}.rejected", self.prefix)
    }

    /// Where a job that failed too many times is reported.
    pub fn dead_letter_subject(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    // --- core NATS ----------------------------------------------------------------------------

    /// Deliveries for one gateway instance.
    pub fn gateway_subject(&self, gateway_id: &str) -> String {
        format!("{}.gw.{gateway_id}", self.prefix)
    }

    // --- Redis --------------------------------------------------------------------------------

    /// Hash of one user's connections: field connection id, value [`presence_entry`]. One key
    /// per user and no hash tag: every command and script on presence touches one such key, so
    /// users spread over a Redis Cluster's slots (docs/RELIABILITY.md, "Presence keys on a
    /// Redis Cluster").
    pub fn presence_key(&self, user: &str) -> String {
        format!("{}:presence:{user}", self.prefix)
    }

    /// One gateway's liveness (no hash tag either; read with single-key commands or per-slot
    /// groups, `crate::slots`): it exists while the gateway is alive, because the gateway keeps
    /// setting it with a Redis expiry of its presence TTL. Its value is the gateway's count of
    /// presence writes, which tells the gateway whether Redis lost any of them.
    pub fn gateway_key(&self, gateway_id: &str) -> String {
        format!("{}:gateway:{gateway_id}", self.prefix)
    }

    /// Held by the one dispatcher sweeping timeouts and expiries at a time.
    pub fn sweep_lock_key(&self) -> String {
        format!("{}:lock:sweep", self.prefix)
    }

    /// Held by the dispatcher that resends one partition of receipts for one sweep interval.
    pub fn resend_lock_key(&self, partition: u16) -> String {
        format!("{}:lock:resend:{partition}", self.prefix)
    }
}

/// Separates a presence entry's gateway from its generation; gateway ids cannot hold it.
const ENTRY_SEPARATOR: char = '/';

/// The value of a connection's field in its user's presence hash: `<gateway>/<generation>`.
/// The generation changes each time the gateway writes all its connections again after Redis
/// lost some of them (its liveness key gone), so a dispatcher pruning the entry of a gateway it
/// saw dead deletes it only if it still holds the value read before that check: a gateway that
/// came back meanwhile has written another value, and keeps its entry.
pub fn presence_entry(gateway_id: &str, generation: u64) -> String {
    format!("{gateway_id}{ENTRY_SEPARATOR}{generation}")
}

/// The gateway id in a presence entry. A bare gateway id (what gateways wrote before entries
/// carried a generation) reads as that gateway, so entries of older gateways stay routable
/// during a rolling upgrade. `None` when the generation is not a number.
pub fn presence_entry_gateway(entry: &str) -> Option<&str> {
    match entry.split_once(ENTRY_SEPARATOR) {
        None => Some(entry),
        Some((gateway, generation)) => generation.parse::<u64>().is_ok().then_some(gateway),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_carries_the_prefix() {
        let n = Names::new("t-1");
        assert_eq!(n.jobs_stream(), "T_1_JOBS");
        assert_eq!(n.jobs_subjects(), "t-1.publish.>");
        assert_eq!(n.gateway_subject("gw-a"), "t-1.gw.gw-a");
        assert_eq!(n.presence_key("alice"), "t-1:presence:alice");
        assert_eq!(n.gateway_key("gw-a"), "t-1:gateway:gw-a");
        assert!(n.ack_events_subject("g").starts_with("t-1.events."));
        assert!(n.more_events_subject("g").starts_with("t-1.events."));
        assert!(n.topic_ack_events_subject("g").starts_with("t-1.events."));
        assert_eq!(n.topics_stream(), "T_1_TOPICS");
        let topic = herald_proto::TopicName::new("sports.football").unwrap();
        assert_eq!(n.topic_subject(&topic), "t-1.topic.sports.football");
    }

    #[test]
    fn a_presence_entry_names_its_gateway_with_or_without_a_generation() {
        assert_eq!(presence_entry("gw-a", 3), "gw-a/3");
        assert_eq!(presence_entry_gateway(&presence_entry("gw-a", 3)), Some("gw-a"));
        assert_ne!(presence_entry("gw-a", 3), presence_entry("gw-a", 4), "a new generation, a new value");
        assert_eq!(presence_entry_gateway("gw-a"), Some("gw-a"), "written by an older gateway");
        assert_eq!(presence_entry_gateway("gw-a/x"), None);
        assert_eq!(presence_entry_gateway("gw-a/"), None);
    }
}
