//! Topics: what a token allows a client to subscribe to ([`TopicPattern`]), why a `subscribe` or
//! `unsubscribe` is refused ([`TopicRefusal`]), and what a topic message is on the topics stream
//! ([`TopicPublication`]) and on a client's socket ([`TopicNotification`]).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{MessageId, TopicName};
use crate::UnixMillis;

/// One entry of a token's `topics` claim: an exact topic name (`news`), or a prefix pattern
/// (`sports.*`) that allows every topic with at least one more token after the prefix
/// (`sports.football`, `sports.football.live`, but not `sports` itself). Nothing else is a
/// pattern: no bare `*`, no wildcard inside a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicPattern {
    Exact(TopicName),
    Prefix(TopicName),
}

impl TopicPattern {
    /// What a claim entry looks like, for error messages and docs.
    pub const RULE: &'static str = "a topic name, or a topic name followed by `.*`";

    /// Parses one claim entry; None for anything outside the syntax.
    pub fn parse(entry: &str) -> Option<Self> {
        match entry.strip_suffix(".*") {
            Some(prefix) => TopicName::new(prefix).ok().map(Self::Prefix),
            None => TopicName::new(entry).ok().map(Self::Exact),
        }
    }

    pub fn matches(&self, topic: &TopicName) -> bool {
        match self {
            Self::Exact(name) => name == topic,
            Self::Prefix(prefix) => {
                topic.as_str().strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('.'))
            }
        }
    }
}

/// Whether any of `patterns` allows `topic`.
pub fn allowed(patterns: &[TopicPattern], topic: &TopicName) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

/// Which client frame a `topic_refused` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum TopicRequest {
    Subscribe,
    Unsubscribe,
}

/// Why a `subscribe` or `unsubscribe` was refused. The connection stays open either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum TopicRefusal {
    /// The `topic` is not a topic name.
    InvalidTopic,
    /// The token's `topics` claim does not allow this topic.
    NotAllowed,
    /// The connection holds as many subscriptions as a connection may.
    TooManySubscriptions,
    /// The connection is subscribed to this topic already.
    AlreadySubscribed,
    /// An `unsubscribe` of a topic the connection is not subscribed to.
    NotSubscribed,
}

/// A topic message as the dispatcher stores it on the topics stream, on the subject
/// `herald.topic.<topic>`. Its offset is its sequence in that stream, which is not in the body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicPublication {
    pub id: MessageId,
    pub topic: TopicName,
    pub payload: Box<RawValue>,
    pub published_at_ms: UnixMillis,
    pub expires_at_ms: UnixMillis,
}

/// One topic message on a client's socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct TopicNotification {
    pub topic: TopicName,
    /// The message's position in Herald's topics stream: it grows with publish order, with gaps
    /// (other topics' messages). Pass the last one you got as `since` when you subscribe again.
    pub offset: u64,
    pub id: MessageId,
    #[cfg_attr(test, ts(type = "unknown"))]
    pub payload: Box<RawValue>,
    pub published_at_ms: UnixMillis,
    pub expires_at_ms: UnixMillis,
}

impl TopicNotification {
    pub fn new(publication: TopicPublication, offset: u64) -> Self {
        let TopicPublication { id, topic, payload, published_at_ms, expires_at_ms } = publication;
        Self { topic, offset, id, payload, published_at_ms, expires_at_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    #[test]
    fn patterns_are_exact_names_or_prefixes() {
        let claim: Vec<TopicPattern> = ["news", "sports.*"].iter().filter_map(|e| TopicPattern::parse(e)).collect();
        assert_eq!(claim.len(), 2);
        for yes in ["news", "sports.football", "sports.football.live"] {
            assert!(allowed(&claim, &name(yes)), "{yes}");
        }
        for no in ["news.eu", "sports", "sportsfan", "sportsfan.x", "weather"] {
            assert!(!allowed(&claim, &name(no)), "{no}");
        }
        for bad in ["*", "", ".*", "a.*.b", "a*", "news.>", "a..*", "sports.**"] {
            assert_eq!(TopicPattern::parse(bad), None, "{bad:?}");
        }
    }
}
