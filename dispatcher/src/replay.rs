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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use herald_proto::{ConnectionId, GatewayId, More, Notification, Online, UserId};
use herald_shared::Clock;

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
/// first, fetched with one more than `page` so that a full page knows whether more follow;
/// `complete` false when the query that found them was cut short before they ended, so that more
/// may follow however few they are (see [`share`]). A page covers at most `page` of them and
/// carries at most `max_bytes` (at least one notification, which the payload limit keeps far
/// below one command); the next page starts after the last one it covers, sent or not, so a
/// receipt that cannot be sent never stalls a replay.
pub fn cut(candidates: &[Candidate], page: usize, max_bytes: usize, complete: bool) -> Cut {
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
    let more = take < candidates.len() || !complete;
    let more_after_seq = if more { candidates[..take].last().map(|c| c.seq) } else { None };
    Cut { take, more_after_seq }
}

/// What one page start got of a query shared by a round's starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share<T> {
    /// Its oldest pending receipts, at most a fetch; with fewer, there are no more.
    Complete(Vec<T>),
    /// Its oldest pending receipts, but the shared query was full before they ended: more may
    /// follow the last.
    Partial(Vec<T>),
    /// Nothing, from a full query: the other starts crowded it out, and it needs a query of its
    /// own.
    Unknown,
}

/// Divides the answer of one query shared by several page starts (the oldest pending receipts
/// of all their users after the lowest start, at most `fetch` per start in all, oldest first)
/// among `starts`: each gets its user's receipts after its own start, at most `fetch`. A query
/// that came back `full` may have stopped before a start's receipts ended; since it returns
/// the oldest first, what a start got is still its oldest, so it makes a page (one that says
/// more may follow), and only a start that got nothing needs a query of its own. So a round of
/// any number of page requests costs one store query, where it cost one per request.
pub fn share<T>(
    starts: &[(UserId, Option<u64>)],
    found: &[T],
    fetch: usize,
    full: bool,
    key: impl Fn(&T) -> (&UserId, u64),
) -> Vec<Share<T>>
where
    T: Clone,
{
    starts
        .iter()
        .map(|(user, after)| {
            let after = after.unwrap_or(0);
            let mine: Vec<T> = found
                .iter()
                .filter(|r| {
                    let (u, seq) = key(r);
                    u == user && seq > after
                })
                .take(fetch)
                .cloned()
                .collect();
            match (mine.len(), full) {
                (n, _) if n >= fetch => Share::Complete(mine),
                (_, false) => Share::Complete(mine),
                (0, true) => Share::Unknown,
                (_, true) => Share::Partial(mine),
            }
        })
        .collect()
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
    /// Judges which receipts have expired.
    pub clock: Clock,
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
        let now = self.clock.now_ms();
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
        let mut starts: Vec<Start<'r>> = requests.iter().map(|r| (&r.user, r.after_seq)).collect();
        starts.sort_unstable();
        starts.dedup();
        // First pages in one query, further pages in another (each from the lowest start among
        // them): two round trips for a round, not one per request. Expiry is judged below, from
        // the notifications, not by the store.
        let (firsts, further): (Vec<Start<'r>>, Vec<Start<'r>>) = starts.into_iter().partition(|(_, a)| a.is_none());
        let mut fetched: BTreeMap<Start<'r>, (Vec<ReceiptDoc>, bool)> = BTreeMap::new();
        for group in [firsts, further] {
            if group.is_empty() {
                continue;
            }
            let mut users: Vec<&UserId> = group.iter().map(|(u, _)| *u).collect();
            users.sort_unstable();
            users.dedup();
            let floor = group.iter().filter_map(|(_, a)| *a).min();
            let limit = fetch * group.len();
            let found = self.store.pending_receipts_after(&users, floor, limit).await?;
            let owned: Vec<(UserId, Option<u64>)> = group.iter().map(|(u, a)| ((*u).clone(), *a)).collect();
            let shares = share(&owned, &found, fetch, found.len() >= limit, |r: &ReceiptDoc| {
                (&r.user, u64::try_from(r.seq).unwrap_or(0))
            });
            for (start, got) in group.into_iter().zip(shares) {
                let entry = match got {
                    Share::Complete(receipts) => (receipts, true),
                    Share::Partial(receipts) => (receipts, false),
                    Share::Unknown => (self.store.pending_receipts_after(&[start.0], start.1, fetch).await?, true),
                };
                fetched.insert(start, entry);
            }
        }

        // Payloads for all pages at once; a receipt in two pages (two starts for one user) is
        // loaded once.
        // Per start, its receipts (id and seq) oldest first.
        let mut order: BTreeMap<Start<'_>, (Vec<(String, u64)>, bool)> = BTreeMap::new();
        let mut unique: HashMap<String, ReceiptDoc> = HashMap::new();
        for (key, (receipts, complete)) in fetched {
            let (list, _) = order.entry(key).or_insert((Vec::new(), complete));
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
        for (key, (receipts, complete)) in order {
            let candidates: Vec<Candidate> = receipts
                .iter()
                .map(|(id, seq)| Candidate { seq: *seq, bytes: sendable.get(id).map(routing::notification_bytes) })
                .collect();
            let cut = cut(&candidates, self.page, routing::MAX_PAGE_BYTES, complete);
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
        assert_eq!(cut(&c, 3, 1000, true), Cut { take: 3, more_after_seq: Some(12) });
    }

    #[test]
    fn the_last_page_ends_the_backlog() {
        assert_eq!(cut(&candidates(&[Some(1), Some(1)]), 3, 1000, true), Cut { take: 2, more_after_seq: None });
        assert_eq!(
            cut(&candidates(&[Some(1), Some(1), Some(1)]), 3, 1000, true),
            Cut { take: 3, more_after_seq: None }
        );
        assert_eq!(cut(&[], 3, 1000, true), Cut { take: 0, more_after_seq: None });
    }

    #[test]
    fn a_page_stops_short_of_the_byte_limit_and_the_next_takes_over() {
        let c = candidates(&[Some(400), Some(400), Some(400)]);
        assert_eq!(cut(&c, 10, 1000, true), Cut { take: 2, more_after_seq: Some(11) });
        // One notification always goes, whatever its size.
        assert_eq!(cut(&candidates(&[Some(5000), Some(1)]), 10, 1000, true), Cut { take: 1, more_after_seq: Some(10) });
    }

    #[test]
    fn receipts_that_cannot_be_sent_are_passed_over_never_stalled_on() {
        // A page of gone messages carries nothing but still moves the start on.
        let c = candidates(&[None, None, None]);
        assert_eq!(cut(&c, 2, 1000, true), Cut { take: 2, more_after_seq: Some(11) });
        // They do not count against the bytes.
        let c = candidates(&[Some(600), None, Some(300), Some(300)]);
        assert_eq!(cut(&c, 10, 1000, true), Cut { take: 3, more_after_seq: Some(12) });
    }

    #[test]
    fn a_page_from_a_query_cut_short_says_more_may_follow_however_short() {
        let c = candidates(&[Some(1), Some(1)]);
        assert_eq!(cut(&c, 3, 1000, false), Cut { take: 2, more_after_seq: Some(11) });
        assert_eq!(cut(&c, 3, 1000, true), Cut { take: 2, more_after_seq: None });
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    /// (user, seq) pairs as a shared query returns them: oldest first.
    fn found(rows: &[(&str, u64)]) -> Vec<(UserId, u64)> {
        rows.iter().map(|(u, seq)| (user(u), *seq)).collect()
    }

    fn seqs(share: &Share<(UserId, u64)>) -> (&'static str, Vec<u64>) {
        match share {
            Share::Complete(r) => ("complete", r.iter().map(|(_, s)| *s).collect()),
            Share::Partial(r) => ("partial", r.iter().map(|(_, s)| *s).collect()),
            Share::Unknown => ("unknown", vec![]),
        }
    }

    #[test]
    fn a_shared_query_gives_each_start_its_own_receipts_after_its_own_start() {
        let starts = [(user("a"), None), (user("b"), Some(3)), (user("a"), Some(4))];
        let rows = found(&[("a", 2), ("b", 3), ("a", 4), ("b", 5), ("a", 6), ("b", 7)]);
        let shares: Vec<_> = share(&starts, &rows, 3, false, |(u, s)| (u, *s)).iter().map(seqs).collect();
        assert_eq!(
            shares,
            [("complete", vec![2, 4, 6]), ("complete", vec![5, 7]), ("complete", vec![6])],
            "each start its user's receipts after it; none from another user"
        );
    }

    #[test]
    fn a_full_query_makes_short_shares_partial_and_empty_ones_unknown() {
        // Fetch 2 for three starts: a limit of 6, filled by a's and b's backlogs before c's came.
        let starts = [(user("a"), None), (user("b"), None), (user("c"), None)];
        let rows = found(&[("a", 1), ("b", 2), ("a", 3), ("a", 4), ("a", 5), ("b", 6)]);
        let shares: Vec<_> = share(&starts, &rows, 2, true, |(u, s)| (u, *s)).iter().map(seqs).collect();
        assert_eq!(shares, [("complete", vec![1, 3]), ("complete", vec![2, 6]), ("unknown", vec![])]);
        let rows = found(&[("a", 1), ("b", 2), ("a", 3), ("a", 4)]);
        let shares: Vec<_> = share(&starts[..2], &rows, 3, true, |(u, s)| (u, *s)).iter().map(seqs).collect();
        assert_eq!(shares, [("complete", vec![1, 3, 4]), ("partial", vec![2])], "b's backlog may go on past 2");
    }

    #[test]
    fn pages_from_shared_queries_walk_every_backlog_in_order_without_gaps() {
        // Three users with backlogs of different lengths, interleaved in seq, replayed in rounds
        // of shared queries with pages of 4 (fetch 5): every user gets all of its own, in order.
        let backlog: Vec<(UserId, u64)> =
            (1..=60u64).map(|seq| (user(["a", "b", "c"][(seq % 7 % 3) as usize]), seq)).collect();
        let mut after: Vec<Option<Option<u64>>> = vec![Some(None); 3];
        let mut got: Vec<Vec<u64>> = vec![Vec::new(); 3];
        let names = ["a", "b", "c"];
        for _round in 0..100 {
            let active: Vec<usize> = (0..3).filter(|i| after[*i].is_some()).collect();
            if active.is_empty() {
                break;
            }
            let starts: Vec<(UserId, Option<u64>)> =
                active.iter().map(|i| (user(names[*i]), after[*i].unwrap())).collect();
            let floor = starts.iter().filter_map(|(_, a)| *a).min().unwrap_or(0);
            let limit = 5 * starts.len();
            let rows: Vec<(UserId, u64)> = backlog
                .iter()
                .filter(|(u, s)| *s > floor && starts.iter().any(|(su, _)| su == u))
                .take(limit)
                .cloned()
                .collect();
            let shares = share(&starts, &rows, 5, rows.len() >= limit, |(u, s)| (u, *s));
            for (i, got_share) in active.into_iter().zip(shares) {
                let (list, complete) = match got_share {
                    Share::Complete(r) => (r, true),
                    Share::Partial(r) => (r, false),
                    Share::Unknown => {
                        let start = after[i].unwrap().unwrap_or(0);
                        let own: Vec<_> = backlog
                            .iter()
                            .filter(|(u, s)| u.as_str() == names[i] && *s > start)
                            .take(5)
                            .cloned()
                            .collect();
                        (own, true)
                    }
                };
                let candidates: Vec<Candidate> =
                    list.iter().map(|(_, seq)| Candidate { seq: *seq, bytes: Some(1) }).collect();
                let page = cut(&candidates, 4, 1000, complete);
                got[i].extend(candidates[..page.take].iter().map(|c| c.seq));
                after[i] = page.more_after_seq.map(Some);
            }
        }
        for (i, name) in names.iter().enumerate() {
            let want: Vec<u64> = backlog.iter().filter(|(u, _)| u.as_str() == *name).map(|(_, s)| *s).collect();
            assert_eq!(got[i], want, "{name}");
        }
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
            let page = cut(fetched, 100, routing::MAX_PAGE_BYTES, true);
            covered.extend(fetched[..page.take].iter().map(|c| c.seq));
            match page.more_after_seq {
                Some(seq) => after = seq,
                None => break,
            }
        }
        assert_eq!(covered, (1..=1000).collect::<Vec<_>>());
    }
}
