//! A session's topic decisions, without I/O: whether a `subscribe` or `unsubscribe` is done or
//! refused (and why), which topics the connection holds, and which topic messages it was sent,
//! so that only an ack of one of those counts for the message's aggregate receipt, once.
//! The index and the recovery are the gateway's ([`crate::topics`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use herald_proto::topic::allowed;
use herald_proto::{MessageId, ServerFrame, TopicName, TopicPattern, TopicRefusal, TopicRequest};

use crate::registry::Sent;

/// Topic messages remembered per connection for their acks; an older one's ack is not counted.
pub(crate) const TOPIC_SENT_REMEMBERED: usize = 1024;

/// What a topic frame asks of the session's I/O.
#[derive(Debug)]
pub(crate) enum TopicAction {
    /// Add the subscription (and recover after `since`, then answer `subscribed`).
    Subscribe { topic: TopicName, since: Since },
    /// Remove it, then answer `unsubscribed`.
    Unsubscribe(TopicName),
    /// Queue this answer (a refusal).
    Answer(ServerFrame),
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Since {
    /// Live only: no `since` was given.
    Now,
    /// Recover what came after this offset first.
    Offset(u64),
    /// A `since` past the connection's recovery budget: live only, answered `recovered: false`.
    Throttled,
}

/// One connection's topics.
#[derive(Debug)]
pub(crate) struct Topics {
    /// The token's `topics` claim: what may be subscribed to.
    claim: Arc<[TopicPattern]>,
    /// Subscriptions one connection may hold.
    max: usize,
    subscribed: HashSet<TopicName>,
    /// Topic messages written, by id, with their topic and whether acked: bounded, oldest out.
    sent: HashMap<Arc<str>, (TopicName, bool), foldhash::fast::RandomState>,
    order: VecDeque<Arc<str>>,
}

impl Topics {
    pub(crate) fn new(claim: Arc<[TopicPattern]>, max: usize) -> Self {
        Self { claim, max, subscribed: HashSet::new(), sent: HashMap::default(), order: VecDeque::new() }
    }

    pub(crate) fn subscribed(&self) -> impl Iterator<Item = &TopicName> {
        self.subscribed.iter()
    }

    /// A `subscribe`: done if the name is a topic name the claim allows, not held already, and
    /// within the cap; refused with the first reason that applies otherwise.
    /// `may_recover`: whether a `since` is within the connection's recovery budget.
    pub(crate) fn on_subscribe(&mut self, topic: String, since: Option<u64>, may_recover: bool) -> TopicAction {
        let refuse = |topic, reason, message| refused(TopicRequest::Subscribe, topic, reason, message);
        let Ok(name) = TopicName::new(topic.as_str()) else {
            return refuse(topic, TopicRefusal::InvalidTopic, TopicName::RULE);
        };
        if !allowed(&self.claim, &name) {
            return refuse(topic, TopicRefusal::NotAllowed, "the token's topics claim does not allow this topic");
        }
        if self.subscribed.contains(&name) {
            return refuse(topic, TopicRefusal::AlreadySubscribed, "subscribed already");
        }
        if self.subscribed.len() >= self.max {
            return refuse(topic, TopicRefusal::TooManySubscriptions, "this connection holds its most subscriptions");
        }
        self.subscribed.insert(name.clone());
        let since = match since {
            None => Since::Now,
            Some(offset) if may_recover => Since::Offset(offset),
            Some(_) => Since::Throttled,
        };
        TopicAction::Subscribe { topic: name, since }
    }

    /// An `unsubscribe`: done for a topic held, refused otherwise.
    pub(crate) fn on_unsubscribe(&mut self, topic: String) -> TopicAction {
        let refuse = |topic, reason, message| refused(TopicRequest::Unsubscribe, topic, reason, message);
        let Ok(name) = TopicName::new(topic.as_str()) else {
            return refuse(topic, TopicRefusal::InvalidTopic, TopicName::RULE);
        };
        if !self.subscribed.remove(&name) {
            return refuse(topic, TopicRefusal::NotSubscribed, "not subscribed");
        }
        TopicAction::Unsubscribe(name)
    }

    /// A topic message was written to the socket.
    pub(crate) fn on_written(&mut self, sent: &Sent) {
        let Some(topic) = &sent.topic else { return };
        if self.sent.contains_key(&sent.id) {
            return;
        }
        if self.order.len() >= TOPIC_SENT_REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                self.sent.remove(&oldest);
            }
        }
        self.order.push_back(Arc::clone(&sent.id));
        self.sent.insert(Arc::clone(&sent.id), (topic.clone(), false));
    }

    /// An ack (or read) of `id`: its topic, the first time for a topic message this connection
    /// was sent; None otherwise (not a topic message sent here, forgotten, or acked before).
    pub(crate) fn ack(&mut self, id: &MessageId) -> Option<TopicName> {
        match self.sent.get_mut(id.as_str()) {
            Some((topic, acked)) if !*acked => {
                *acked = true;
                Some(topic.clone())
            }
            _ => None,
        }
    }
}

/// The answer refusing a `subscribe` or `unsubscribe` of `topic`, with its reason.
fn refused(request: TopicRequest, topic: String, reason: TopicRefusal, message: &str) -> TopicAction {
    TopicAction::Answer(ServerFrame::TopicRefused { request, topic, reason, message: message.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(claim: &[&str], max: usize) -> Topics {
        Topics::new(claim.iter().filter_map(|e| TopicPattern::parse(e)).collect(), max)
    }

    fn refusal(action: TopicAction) -> TopicRefusal {
        match action {
            TopicAction::Answer(ServerFrame::TopicRefused { reason, .. }) => reason,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn subscribe_within_the_claim_and_the_cap_only() {
        let mut t = topics(&["news", "sports.*"], 2);
        let news = TopicName::new("news").unwrap();
        assert!(
            matches!(t.on_subscribe("news".into(), Some(3), true), TopicAction::Subscribe { topic, since: Since::Offset(3) } if topic == news)
        );
        assert_eq!(refusal(t.on_subscribe("news".into(), None, true)), TopicRefusal::AlreadySubscribed);
        assert_eq!(refusal(t.on_subscribe("weather".into(), None, true)), TopicRefusal::NotAllowed);
        assert_eq!(refusal(t.on_subscribe("sports".into(), None, true)), TopicRefusal::NotAllowed);
        assert_eq!(refusal(t.on_subscribe("news.*".into(), None, true)), TopicRefusal::InvalidTopic);
        assert_eq!(refusal(t.on_subscribe("".into(), None, true)), TopicRefusal::InvalidTopic);
        assert!(matches!(t.on_subscribe("sports.f1".into(), None, true), TopicAction::Subscribe { .. }));
        assert_eq!(refusal(t.on_subscribe("sports.golf".into(), None, true)), TopicRefusal::TooManySubscriptions);
        assert!(matches!(t.on_unsubscribe("news".into()), TopicAction::Unsubscribe(topic) if topic == news));
        assert_eq!(refusal(t.on_unsubscribe("news".into())), TopicRefusal::NotSubscribed);
        assert_eq!(refusal(t.on_unsubscribe("a..b".into())), TopicRefusal::InvalidTopic);
        assert!(
            matches!(t.on_subscribe("sports.golf".into(), None, true), TopicAction::Subscribe { .. }),
            "room again"
        );
        assert!(
            matches!(
                topics(&["news"], 2).on_subscribe("news".into(), Some(9), false),
                TopicAction::Subscribe { since: Since::Throttled, .. }
            ),
            "past the recovery budget: live, not recovered"
        );
        let no_claim = &mut topics(&[], 10);
        assert_eq!(refusal(no_claim.on_subscribe("news".into(), None, true)), TopicRefusal::NotAllowed);
    }

    #[test]
    fn only_the_first_ack_of_a_topic_message_sent_here_counts() {
        let mut t = topics(&["news"], 2);
        let sent = |id: &str, topic: Option<&str>| Sent {
            topic: topic.map(|t| TopicName::new(t).unwrap()),
            ..Sent::direct(id, u64::MAX)
        };
        t.on_written(&sent("t1", Some("news")));
        t.on_written(&sent("d1", None));
        let id = |s: &str| MessageId::new(s).unwrap();
        assert_eq!(t.ack(&id("t1")), Some(TopicName::new("news").unwrap()));
        assert_eq!(t.ack(&id("t1")), None, "once");
        assert_eq!(t.ack(&id("d1")), None, "not a topic message");
        assert_eq!(t.ack(&id("never")), None);
        for i in 0..TOPIC_SENT_REMEMBERED {
            t.on_written(&sent(&format!("x{i}"), Some("news")));
        }
        assert_eq!(t.sent.len(), TOPIC_SENT_REMEMBERED, "bounded");
    }
}
