//! Topic jobs (`topic` in place of `to`): claimed in the store once (the id, the content, the
//! aggregate receipt), published once to the topics stream, then acked. The dispatcher never
//! learns who subscribes: every gateway reads the topics stream and fans out to its own
//! subscribers. A crash anywhere before the ack redelivers the job; the claim remembers an
//! offset once the message is on the stream, and `Nats-Msg-Id` (the message id) drops a second
//! publish within the duplicate window, so a redelivery adds nothing.

use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::AckKind;
use herald_proto::{TopicName, TopicPublication};
use herald_publish::validate::ValidJob;

use super::{Attempt, Job, JobPipeline, Verdict};
use crate::store::{StoreError, TopicClaim};

/// How one attempt at a topic job went.
#[derive(Debug)]
pub(super) enum Step {
    /// On the topics stream at this offset.
    Published(u64),
    /// The id is another topic message's.
    Conflict,
    /// The store or NATS failed; `transient` ones are retried without counting as attempts.
    Failed { transient: bool, reason: String },
}

/// What to tell JetStream about a topic job after `step`: ack what is published, reject a
/// conflict, retry a transient failure after a second whatever the attempt, and a permanent one
/// as stored jobs are retried ([`super::verdict`]'s delays), dead-lettering it at `max_attempts`.
pub(super) fn topic_verdict(step: Step, attempt: Attempt, max_attempts: u64) -> Verdict {
    match step {
        Step::Published(_) => Verdict::Stored { route: Vec::new() },
        Step::Conflict => Verdict::Conflict,
        Step::Failed { transient: true, reason } => Verdict::Retry { delay: Duration::from_secs(1), reason },
        Step::Failed { reason, .. } if attempt.delivered < max_attempts => {
            Verdict::Retry { delay: Duration::from_secs(attempt.delivered.min(30)), reason }
        }
        Step::Failed { reason, .. } => Verdict::DeadLetter { reason },
    }
}

fn store_failed(e: StoreError) -> Step {
    Step::Failed { transient: e.is_transient(), reason: e.to_string() }
}

impl JobPipeline {
    /// The topic jobs of one batch: claimed together, published in the batch's order (one
    /// connection's publishes reach the stream in the order sent, so offsets follow the jobs'
    /// order within a batch), then settled one by one.
    pub(super) async fn topic_jobs(&self, jobs: Vec<(Job, TopicName)>) {
        let claims = futures::future::join_all(
            jobs.iter().map(|(job, topic)| self.store.claim_topic_message(&job.valid, topic)),
        )
        .await;
        let mut sent = Vec::with_capacity(jobs.len());
        for ((job, topic), claim) in jobs.into_iter().zip(claims) {
            let step = match claim {
                Ok(TopicClaim::Conflict) => Err(Step::Conflict),
                // Published by an earlier delivery: only the ack was lost.
                Ok(TopicClaim::Ours { offset: Some(offset) }) => Err(Step::Published(offset)),
                Ok(TopicClaim::Ours { offset: None }) => self.send_topic(&job.valid, &topic).await,
                Err(e) => Err(store_failed(e)),
            };
            sent.push((job, topic, step));
        }
        for (job, topic, step) in sent {
            let step = match step {
                Ok(ack) => self.published(&job.valid, ack).await,
                Err(step) => step,
            };
            if let Step::Published(offset) = &step {
                tracing::debug!(topic = %topic, offset, id = %job.valid.message_id, "topic message published");
            }
            self.settle_topic(job, step).await;
        }
    }

    async fn settle_topic(&self, job: Job, step: Step) {
        let attempt = Attempt { delivered: job.pulled.delivered, interrupted: false };
        let verdict = topic_verdict(step, attempt, self.max_attempts);
        if let Verdict::Retry { delay, reason } = &verdict {
            // Transient or not, handed back here; `settle` would count it as a stored job's retry.
            tracing::warn!(seq = job.pulled.stream_seq, %reason, "topic job not published; will retry");
            self.metrics.jobs.with_label_values(&["retried"]).inc();
            let _ = job.pulled.message.ack_with(AckKind::Nak(Some(*delay))).await;
            return;
        }
        self.settle(job.then(verdict)).await;
    }

    /// Sends the topic message to the topics stream, without waiting for JetStream's ack.
    async fn send_topic(&self, job: &ValidJob, topic: &TopicName) -> Result<PublishAckFuture, Step> {
        let publication = TopicPublication {
            id: job.message_id.clone(),
            topic: topic.clone(),
            payload: job.payload.clone(),
            published_at_ms: job.published_at_ms,
            expires_at_ms: job.expires_at_ms,
        };
        let Ok(body) = serde_json::to_vec(&publication) else {
            return Err(Step::Failed { transient: false, reason: "topic message not serializable".into() });
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.message_id.as_str());
        let subject = self.names.topic_subject(topic);
        self.js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| Step::Failed { transient: true, reason: format!("topics stream: {e}") })
    }

    /// JetStream's answer to a send, and the offset recorded.
    async fn published(&self, job: &ValidJob, ack: PublishAckFuture) -> Step {
        let offset = match ack.await {
            Ok(ack) => ack.sequence,
            Err(e) => return Step::Failed { transient: true, reason: format!("topics stream: {e}") },
        };
        // Without the offset recorded, a redelivery publishes again, which the stream drops
        // within its duplicate window: worth a warning, not a failure of the job.
        if let Err(e) = self.store.set_topic_offset(&job.message_id, offset).await {
            tracing::warn!(error = %e, id = %job.message_id, "topic offset not recorded");
        }
        Step::Published(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(delivered: u64) -> Attempt {
        Attempt { delivered, interrupted: false }
    }

    #[test]
    fn published_is_acked_conflicts_rejected_failures_retried_then_dead_lettered() {
        assert_eq!(topic_verdict(Step::Published(7), attempt(1), 5), Verdict::Stored { route: vec![] });
        assert_eq!(topic_verdict(Step::Conflict, attempt(1), 5), Verdict::Conflict);
        let transient = || Step::Failed { transient: true, reason: "down".into() };
        assert_eq!(
            topic_verdict(transient(), attempt(99), 5),
            Verdict::Retry { delay: Duration::from_secs(1), reason: "down".into() },
            "an outage never dead-letters"
        );
        let permanent = || Step::Failed { transient: false, reason: "no".into() };
        assert_eq!(
            topic_verdict(permanent(), attempt(2), 5),
            Verdict::Retry { delay: Duration::from_secs(2), reason: "no".into() }
        );
        assert_eq!(topic_verdict(permanent(), attempt(5), 5), Verdict::DeadLetter { reason: "no".into() });
    }
}
