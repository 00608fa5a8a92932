//! The ids that cross Herald's boundaries, as types. Each is a `#[serde(transparent)]` string on
//! the wire, but can only be built (constructed or decoded) from a well-formed value, so a
//! frame, a job or an event that names a malformed id fails to decode instead of reaching a
//! store filter or a key. The grammar of each is in proto/README.md ("Ids").
//!
//! Validation is the contract's: both services and the store take these types, never strings,
//! so a connection id cannot be passed where a user id belongs.
//!
//! An id is an `Arc<str>`: every connection, queue entry and ack record that names a user or a
//! connection shares one allocation, and a clone is a reference count, not a copy.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid id of some kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} must be {rule}")]
pub struct InvalidId {
    pub kind: &'static str,
    pub rule: &'static str,
}

/// `value` as an id, decoded straight from the input: one allocation, no `String` on the way.
fn checked(
    value: &str,
    kind: &'static str,
    rule: &'static str,
    check: fn(&str) -> bool,
) -> Result<Arc<str>, InvalidId> {
    if check(value) {
        Ok(Arc::from(value))
    } else {
        Err(InvalidId { kind, rule })
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(test, derive(ts_rs::TS), ts(type = "string"))]
        pub struct $name(Arc<str>);

        impl $name {
            /// What a valid value looks like, for error messages and docs.
            pub const RULE: &'static str = $rule;

            /// Checks `value` against the grammar.
            pub fn new(value: impl AsRef<str>) -> Result<Self, InvalidId> {
                checked(value.as_ref(), $kind, $rule, $check).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0.to_string()
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} ({})", $kind, $rule)
                    }
                    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<$name, E> {
                        checked(value, $kind, $rule, $check).map($name).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(value: &str) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                *self.0 == **other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                *self.0 == **other
            }
        }
    };
}

/// Longest message id, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 128;
/// Longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest connection or gateway id, in bytes.
pub const MAX_TOKEN_ID_BYTES: usize = 64;

fn is_message_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_MESSAGE_ID_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn is_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_USER_ID_BYTES && !s.chars().any(char::is_control)
}

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 128;

/// Dot-separated tokens of `[A-Za-z0-9_-]`, none empty: each token is one NATS subject token,
/// so a topic's subject (`herald.topic.<name>`) can never hold a wildcard or an empty token.
fn is_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOPIC_BYTES
        && s.split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')))
}

/// One token of a NATS subject and of a Redis key: what connection and gateway ids are.
fn is_token_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOKEN_ID_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

id_type!(
    /// A message's id: the publisher's `id`, or one Herald assigned. It never holds `/`, space or
    /// any character a key could be split on.
    MessageId,
    "a message id",
    "1-128 bytes of [A-Za-z0-9._:-]",
    is_message_id
);

id_type!(
    /// A user: the `sub` of their tokens, and a job's recipient. Deliberately permissive (emails,
    /// `org/alice`), so it is never joined into a key with a separator: stores key by typed
    /// parts instead.
    UserId,
    "a user id",
    "1-256 bytes of UTF-8 without control characters",
    is_user_id
);

id_type!(
    /// One WebSocket connection, assigned by its gateway.
    ConnectionId,
    "a connection id",
    "1-64 bytes of [A-Za-z0-9_-]",
    is_token_id
);

id_type!(
    /// One gateway process; part of its NATS subjects.
    GatewayId,
    "a gateway id",
    "1-64 bytes of [A-Za-z0-9_-]",
    is_token_id
);

id_type!(
    /// A topic: what a topic job is addressed to and what a client subscribes to. It is also
    /// the last part of the topic's NATS subject, hence the subject-token grammar.
    TopicName,
    "a topic name",
    "1-128 bytes of dot-separated tokens of [A-Za-z0-9_-], none empty",
    is_topic_name
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_hold_no_separator() {
        for good in ["m1", "order-1:a.b_c", &"x".repeat(128)] {
            assert!(MessageId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "m1/org", "a b", "é", &"x".repeat(129), "a\u{0}"] {
            assert!(MessageId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_ids_are_permissive_but_bounded() {
        for good in ["alice", "org/alice", "a@b.example", "ünï", &"x".repeat(256)] {
            assert!(UserId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "a\nb", "a\u{7f}", &"x".repeat(257)] {
            assert!(UserId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn topic_names_are_subject_tokens() {
        for good in ["news", "sports.football", "a-b_c.D9", &"x".repeat(128)] {
            assert!(TopicName::new(good).is_ok(), "{good}");
        }
        for bad in ["", ".news", "news.", "a..b", "news.*", "news.>", "a b", "é", &"x".repeat(129)] {
            assert!(TopicName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_clone_shares_the_id_rather_than_copying_it() {
        let user = UserId::new("alice").unwrap();
        let again = user.clone();
        assert!(std::ptr::eq(user.as_str(), again.as_str()));
        let decoded: UserId = serde_json::from_value(serde_json::Value::String("bob".into())).unwrap();
        assert_eq!(decoded, "bob", "an owned string decodes too");
    }

    #[test]
    fn decoding_validates() {
        assert_eq!(serde_json::from_str::<MessageId>(r#""m-1""#).unwrap(), "m-1");
        let err = serde_json::from_str::<MessageId>(r#""m1/org""#).unwrap_err();
        assert!(err.to_string().contains("message id"), "{err}");
        assert!(serde_json::from_str::<UserId>(r#""""#).is_err());
        assert!(serde_json::from_str::<GatewayId>(r#""gw.1""#).is_err());
        assert_eq!(serde_json::to_string(&ConnectionId::new("c1").unwrap()).unwrap(), r#""c1""#);
    }
}
