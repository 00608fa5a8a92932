//! Replays: a connection's pending messages, oldest first, one page at a time. The connection's
//! `online` event asks for the first page; each `more` event, which its gateway sends once the
//! connection has taken a page that said more follows, asks for the page after that one's last
//! `seq`. What a page carries and where the next one starts is [`cut`], a pure rule; the store
//! and NATS are at the edges. Every request is answered, with an empty page when nothing is
//! pending, so that a gateway can tell a lost page from an empty backlog.
//!
//! Only what a page carries gets a retry time (the ack timeout from now). The rest of the backlog
//! keeps its own, and a receipt parked while its user was away stays parked, until its page goes:
//! a long backlog is never left to the ack-timeout sweep. A lost page, or a gateway or dispatcher
//! that dies mid-replay, loses nothing: the receipts are still pending, the gateway asks again,
//! and a client that reconnects starts over from its oldest pending message.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use herald_proto::{ConnectionId, GatewayId, More, Notification, Online, UserId};
use herald_shared::now_ms;

use crate::metrics::DispatcherMetrics;
use crate::routing::{self, Router};
use crate::store::{ReceiptDoc, Store, StoreError};

/// One connection's request for a page of its replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user: UserId,
    pub connection_id: ConnectionId,
    pub gateway_id: GatewayId,
    /// Where the page the connection took ended; None for the first page.
    pub after_seq: Option<u64>,
}

impl From<Online> for Request {
    fn from(o: Online) -> Self {
        Self { user: o.user, connection_id: o.connection_id, gateway_id: o.gateway_id, after_seq: None }
    }
}

impl From<More> for Request {
    fn from(m: More) -> Self {
        Self { user: m.user, connection_id: m.connection_id, gateway_id: m.gateway_id, after_seq: Some(m.after_seq) }
    }
}

/// A pending receipt that may go in a page, with the bytes its notification adds to the command
/// (None: it cannot be sent: it has expired, or its message is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub seq: u64,
    pub bytes: Option<usize>,
}

/// Where a page ends: it covers the first `take` candidates (and carries those that can be
/// sent); when more are pending, the next page starts after `more_after_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub take: usize,
    pub more_after_seq: Option<u64>,
}

/// The page rule. `candidates` are the user's pending receipts after the previous page, oldest
/// first, fetched with one more than `page` so that a full page knows whether more follow. A
/// page covers at most `page` of them and carries at most `max_bytes` (at least one
/// notification, which the payload limit keeps far below one command); the next page starts
/// after the last one it covers, sent or not, so a receipt that cannot be sent never stalls a
/// replay.
pub fn cut(candidates: &[Candidate], page: usize, max_bytes: usize) -> Cut {
    let (mut take, mut bytes, mut carried) = (0, 0, 0);
    for candidate in candidates.iter().take(page) {
        if let Some(size) = candidate.bytes {
            if carried > 0 && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            carried += 1;
        }
        take += 1;
    }
    let more_after_seq = if take < candidates.len() { candidates[..take].last().map(|c| c.seq) } else { None };
    Cut { take, more_after_seq }
}

/// Most receipts one round of [`Replayer::answer`] loads (with their payloads, when they carry
/// them): 127 requests at the default page of 256, where a batch of events could otherwise load
/// 512 × 257. Smaller rounds cost a query each, which nx-27017 answers with a scan of the whole
/// collection (docs/NOTES.md).
pub const ROUND_RECEIPTS: usize = 32_768;

/// Requests per round: as many as [`ROUND_RECEIPTS`] allows at one more than a page each.
pub fn round_size(page: usize) -> usize {
    (ROUND_RECEIPTS / (page + 1)).max(1)
}

/// Where a page starts: the user, and the `seq` it follows (None: the first page).
type Start<'a> = (&'a UserId, Option<u64>);

/// One page, as it goes to every connection that asked for it.
struct Page {
    notifications: Vec<Notification>,
    /// The receipts the page carries: rescheduled once it is sent.
    receipt_ids: Vec<String>,
    more_after_seq: Option<u64>,
}

/// Answers page requests: the store for the backlog, NATS for the pages.
#[derive(Clone)]
pub struct Replayer {
    pub store: Store,
    pub router: Router,
    pub ack_timeout: Duration,
    /// Most receipts per page (`HERALD_REPLAY_PAGE`).
    pub page: usize,
    pub metrics: Arc<DispatcherMetrics>,
}

impl Replayer {
    /// Answers a batch of requests, in rounds of requests whose receipts (one more than a page
    /// each) stay within [`ROUND_RECEIPTS`], so that a storm of connects with long backlogs
    /// holds a bounded number of receipts and payloads at once. A round answered before a store
    /// error is answered again when the batch is retried: a page that comes twice is harmless.
    pub async fn answer(&self, requests: &[Request]) -> Result<(), StoreError> {
        for round in requests.chunks(round_size(self.page)) {
            self.answer_round(round).await?;
        }
        Ok(())
    }

    /// One round: usually one query for all first pages, one per further page, one for the
    /// payloads receipts do not carry, and one to reschedule what was sent. A page NATS does
    /// not take is left to the gateway, which asks again.
    async fn answer_round(&self, requests: &[Request]) -> Result<(), StoreError> {
        if requests.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let pages = self.pages(requests, now).await?;
        let mut sent = Vec::new();
        for request in requests {
            let Some(page) = pages.get(&(&request.user, request.after_seq)) else { continue };
            let command = routing::replay_command(
                &request.user,
                &request.connection_id,
                page.notifications.clone(),
                page.more_after_seq,
            );
            if !self.router.publish(&request.gateway_id, &command).await {
                self.metrics.route_failures.inc();
                continue;
            }
            self.metrics.replayed.inc_by(page.notifications.len() as u64);
            sent.extend(page.receipt_ids.iter().cloned());
        }
        sent.sort_unstable();
        sent.dedup();
        self.store.reschedule(&sent, Some(now + self.ack_timeout.as_millis() as u64)).await
    }

    /// The page for each distinct (user, start) of `requests`, however many connections asked.
    async fn pages<'r>(&self, requests: &'r [Request], now: u64) -> Result<BTreeMap<Start<'r>, Page>, StoreError> {
        // One more than a page, so that a full page knows whether more follow.
        let fetch = self.page + 1;
        let mut fetched: BTreeMap<Start<'_>, Vec<ReceiptDoc>> = BTreeMap::new();
        let mut firsts: Vec<&UserId> = requests.iter().filter(|r| r.after_seq.is_none()).map(|r| &r.user).collect();
        firsts.sort_unstable();
        firsts.dedup();
        // Expiry is judged below, from the notifications, not by the store.
        for receipt in self.store.pending_receipts_for(&firsts, fetch, None).await? {
            if let Some(user) = firsts.iter().find(|u| ***u == receipt.user) {
                fetched.entry((*user, None)).or_default().push(receipt);
            }
        }
        for request in requests {
            let Some(after) = request.after_seq else { continue };
            if let Entry::Vacant(slot) = fetched.entry((&request.user, Some(after))) {
                slot.insert(self.store.pending_receipts_after(&request.user, after, fetch).await?);
            }
        }
        for user in &firsts {
            fetched.entry((*user, None)).or_default();
        }

        // Payloads for all pages at once; a receipt in two pages (two starts for one user) is
        // loaded once.
        // Per start, its receipts (id and seq) oldest first.
        let mut order: BTreeMap<Start<'_>, Vec<(String, u64)>> = BTreeMap::new();
        let mut unique: HashMap<String, ReceiptDoc> = HashMap::new();
        for (key, receipts) in fetched {
            let list = order.entry(key).or_default();
            for receipt in receipts {
                list.push((receipt.id.clone(), u64::try_from(receipt.seq).unwrap_or(0)));
                unique.entry(receipt.id.clone()).or_insert(receipt);
            }
        }
        // What can be sent: its message is there, and it has not expired (never send past the
        // expiry; the sweeper marks it `expired` in its own time).
        let sendable: HashMap<String, Notification> = self
            .store
            .with_payloads(unique.into_values().collect())
            .await?
            .into_iter()
            .filter(|s| s.notification.expires_at_ms > now)
            .map(|s| (s.receipt_id, s.notification))
            .collect();

        let mut pages = BTreeMap::new();
        for (key, receipts) in order {
            let candidates: Vec<Candidate> = receipts
                .iter()
                .map(|(id, seq)| Candidate { seq: *seq, bytes: sendable.get(id).map(routing::notification_bytes) })
                .collect();
            let cut = cut(&candidates, self.page, routing::MAX_PAGE_BYTES);
            let mut page =
                Page { notifications: Vec::new(), receipt_ids: Vec::new(), more_after_seq: cut.more_after_seq };
            for (id, _) in &receipts[..cut.take] {
                if let Some(notification) = sendable.get(id) {
                    page.notifications.push(notification.clone());
                    page.receipt_ids.push(id.clone());
                }
            }
            pages.insert(key, page);
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(sizes: &[Option<usize>]) -> Vec<Candidate> {
        sizes.iter().enumerate().map(|(i, bytes)| Candidate { seq: 10 + i as u64, bytes: *bytes }).collect()
    }

    #[test]
    fn a_full_page_says_where_the_next_starts() {
        // Fetched one more than a page of 3: more follow, after the third.
        let c = candidates(&[Some(1), Some(1), Some(1), Some(1)]);
        assert_eq!(cut(&c, 3, 1000), Cut { take: 3, more_after_seq: Some(12) });
    }

    #[test]
    fn the_last_page_ends_the_backlog() {
        assert_eq!(cut(&candidates(&[Some(1), Some(1)]), 3, 1000), Cut { take: 2, more_after_seq: None });
        assert_eq!(cut(&candidates(&[Some(1), Some(1), Some(1)]), 3, 1000), Cut { take: 3, more_after_seq: None });
        assert_eq!(cut(&[], 3, 1000), Cut { take: 0, more_after_seq: None });
    }

    #[test]
    fn a_page_stops_short_of_the_byte_limit_and_the_next_takes_over() {
        let c = candidates(&[Some(400), Some(400), Some(400)]);
        assert_eq!(cut(&c, 10, 1000), Cut { take: 2, more_after_seq: Some(11) });
        // One notification always goes, whatever its size.
        assert_eq!(cut(&candidates(&[Some(5000), Some(1)]), 10, 1000), Cut { take: 1, more_after_seq: Some(10) });
    }

    #[test]
    fn receipts_that_cannot_be_sent_are_passed_over_never_stalled_on() {
        // A page of gone messages carries nothing but still moves the start on.
        let c = candidates(&[None, None, None]);
        assert_eq!(cut(&c, 2, 1000), Cut { take: 2, more_after_seq: Some(11) });
        // They do not count against the bytes.
        let c = candidates(&[Some(600), None, Some(300), Some(300)]);
        assert_eq!(cut(&c, 10, 1000), Cut { take: 3, more_after_seq: Some(12) });
    }

    #[test]
    fn a_round_holds_a_bounded_number_of_receipts() {
        assert_eq!(round_size(256), 127);
        for page in [1, 100, 256, 1000, 20_000] {
            let n = round_size(page);
            assert!(n >= 1 && (n == 1 || n * (page + 1) <= ROUND_RECEIPTS), "page {page}: {n}");
        }
    }

    #[test]
    fn pages_walk_a_backlog_in_order_without_gaps_or_overlaps() {
        // 1,000 pending, pages of 100 fetched 101 at a time: each page starts where the last
        // ended, and together they cover everything exactly once.
        let backlog: Vec<Candidate> = (1..=1000).map(|seq| Candidate { seq, bytes: Some(100) }).collect();
        let mut after = 0;
        let mut covered = Vec::new();
        loop {
            let start = backlog.iter().position(|c| c.seq > after).unwrap_or(backlog.len());
            let fetched = &backlog[start..(start + 101).min(backlog.len())];
            let page = cut(fetched, 100, routing::MAX_PAGE_BYTES);
            covered.extend(fetched[..page.take].iter().map(|c| c.seq));
            match page.more_after_seq {
                Some(seq) => after = seq,
                None => break,
            }
        }
        assert_eq!(covered, (1..=1000).collect::<Vec<_>>());
    }
}
