//! Where one connection's replay has got to, and when to ask for its next page: a state machine
//! the session drives with the page ends it takes from its queue, its acks and its ticks. Pure;
//! the session does the asking (an `Event::More` on the events stream).
//!
//! The next page is asked for once the previous one has left the connection's queue (its end,
//! queued behind its frames, has been taken), and once the connection's unacked notifications
//! leave room for another page among those the gateway remembers
//! ([`crate::sent::SENT_REMEMBERED`]), so that the acks of a replay still count. So a queue never
//! holds more than one page, and a client that reads and acks gets the next page as soon as a
//! dispatcher answers, never after the ack timeout. A page asked for that has not come within the
//! retry interval (a lost command) is asked for again, at doubling intervals and [`MAX_RETRIES`]
//! times at most: the request itself waits in JetStream for as long as no dispatcher runs, so
//! asking again only covers a page lost on its way back. A page that comes twice is harmless: its
//! frames are repeats the session leaves out, and its end counts once.

use std::time::{Duration, Instant};

/// Times a page that has not come is asked for again before the replay waits for the client's
/// next connection.
pub(crate) const MAX_RETRIES: u32 = 4;

/// The end of one replay page, queued behind the page's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageEnd {
    /// More of the backlog follows, after this `seq`.
    pub(crate) more_after_seq: Option<u64>,
    /// Notifications of the page that were queued.
    pub(crate) len: usize,
}

#[derive(Debug, Clone, Copy)]
struct Asked {
    after_seq: u64,
    at: Instant,
    /// Times asked again.
    retries: u32,
}

impl Asked {
    fn new(after_seq: u64, at: Instant) -> Self {
        Self { after_seq, at, retries: 0 }
    }
}

#[derive(Debug)]
pub(crate) struct ReplayCursor {
    /// The furthest `seq` any page of this connection's replay has reached.
    furthest: u64,
    /// The page to ask for (the one after this `seq`) once the window has room.
    want: Option<u64>,
    /// The page asked for that has not come yet.
    asked: Option<Asked>,
    /// Notifications in the last page: the room the next one needs.
    page_len: usize,
}

impl ReplayCursor {
    /// A new connection: its online announcement asks for the first page.
    pub(crate) fn new(now: Instant) -> Self {
        Self { furthest: 0, want: None, asked: Some(Asked::new(0, now)), page_len: 0 }
    }

    /// A page has left the queue.
    pub(crate) fn page_end(&mut self, end: PageEnd) {
        if end.len > 0 {
            self.page_len = end.len;
        }
        match end.more_after_seq {
            // The backlog fitted in this page, as of the query that made it: whatever was
            // pending after where this connection's replay had got to was in it.
            None => {
                self.want = None;
                self.asked = None;
            }
            Some(seq) if seq > self.furthest => {
                self.furthest = seq;
                self.want = Some(seq);
                self.asked = None;
            }
            // A page from further back (announced again after Redis lost presence) saying more
            // is pending, while this replay is idle: what follows everything it covered.
            Some(_) if self.asked.is_none() && self.want.is_none() => self.want = Some(self.furthest),
            // A page that came twice, or from further back, while the replay goes on.
            Some(_) => {}
        }
    }

    /// The page to ask for now, if one is wanted and `awaiting_ack` (notifications written and
    /// not acked yet) leaves room for it in a `window` of remembered notifications.
    pub(crate) fn next(&mut self, awaiting_ack: usize, window: usize, now: Instant) -> Option<u64> {
        let after = self.want?;
        if awaiting_ack + self.page_len.max(1) > window {
            return None;
        }
        self.want = None;
        self.asked = Some(Asked::new(after, now));
        Some(after)
    }

    /// The page to ask for again: asked for `interval` ago (twice that after the first retry,
    /// and so on) and not come. After [`MAX_RETRIES`] the replay stops asking; what it has not
    /// reached stays pending for the client's next connection.
    pub(crate) fn retry(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        let asked = self.asked?;
        if now.saturating_duration_since(asked.at) < interval * 2u32.pow(asked.retries) {
            return None;
        }
        if asked.retries >= MAX_RETRIES {
            self.asked = None;
            return None;
        }
        self.asked = Some(Asked { at: now, retries: asked.retries + 1, ..asked });
        Some(asked.after_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: usize = 1024;
    const RETRY: Duration = Duration::from_secs(15);

    fn end(more_after_seq: Option<u64>, len: usize) -> PageEnd {
        PageEnd { more_after_seq, len }
    }

    #[test]
    fn each_page_is_asked_for_once_the_one_before_has_left_the_queue() {
        let t = Instant::now();
        let mut cursor = ReplayCursor::new(t);
        assert_eq!(cursor.next(0, WINDOW, t), None, "the online event asked for the first page");
        cursor.page_end(end(Some(256), 256));
        assert_eq!(cursor.next(0, WINDOW, t), Some(256));
        assert_eq!(cursor.next(0, WINDOW, t), None, "asked once");
        cursor.page_end(end(Some(512), 256));
        assert_eq!(cursor.next(0, WINDOW, t), Some(512));
        cursor.page_end(end(None, 10));
        assert_eq!(cursor.next(0, WINDOW, t), None, "the backlog is done");
        assert_eq!(cursor.retry(t + RETRY * 2, RETRY), None, "nothing to ask again");
    }

    #[test]
    fn the_next_page_waits_until_acks_leave_room_for_it() {
        let t = Instant::now();
        let mut cursor = ReplayCursor::new(t);
        cursor.page_end(end(Some(300), 300));
        assert_eq!(cursor.next(800, WINDOW, t), None, "800 unacked + a page of 300 would push acks out");
        assert_eq!(cursor.next(724, WINDOW, t), Some(300), "room once the client acked");
    }

    #[test]
    fn a_page_that_comes_twice_counts_once() {
        let t = Instant::now();
        let mut cursor = ReplayCursor::new(t);
        cursor.page_end(end(Some(100), 100));
        assert_eq!(cursor.next(0, WINDOW, t), Some(100));
        cursor.page_end(end(Some(100), 100));
        assert_eq!(cursor.next(0, WINDOW, t), None, "the first page again, while its successor is asked for");
        cursor.page_end(end(Some(200), 100));
        cursor.page_end(end(Some(200), 100));
        assert_eq!(cursor.next(0, WINDOW, t), Some(200));
        assert_eq!(cursor.next(0, WINDOW, t), None);
    }

    #[test]
    fn a_page_that_does_not_come_is_asked_for_again() {
        let t = Instant::now();
        let mut cursor = ReplayCursor::new(t);
        assert_eq!(cursor.retry(t + RETRY / 2, RETRY), None);
        assert_eq!(cursor.retry(t + RETRY, RETRY), Some(0), "the first page was lost: from the start");
        cursor.page_end(end(Some(50), 50));
        assert_eq!(cursor.next(0, WINDOW, t + RETRY), Some(50));
        assert_eq!(cursor.retry(t + RETRY * 2, RETRY), Some(50));
        assert_eq!(cursor.retry(t + RETRY * 2, RETRY), None, "once per interval");
        cursor.page_end(end(Some(100), 50));
        assert_eq!(cursor.next(0, WINDOW, t + RETRY * 3), Some(100), "the page came after all");
    }

    #[test]
    fn asking_again_backs_off_and_gives_up() {
        let t = Instant::now();
        let mut cursor = ReplayCursor::new(t);
        let mut at = t;
        let mut asked = Vec::new();
        for step in 0..=MAX_RETRIES + 1 {
            // Each retry waits twice as long as the one before.
            at += RETRY * 2u32.pow(step);
            assert_eq!(cursor.retry(at - Duration::from_millis(1), RETRY), None, "not before its time");
            asked.extend(cursor.retry(at, RETRY));
        }
        assert_eq!(asked, vec![0; MAX_RETRIES as usize], "{MAX_RETRIES} retries, then the next connection");
        assert_eq!(cursor.retry(at + RETRY * 1000, RETRY), None);
    }

    #[test]
    fn an_idle_replay_told_of_more_asks_after_all_it_covered() {
        let t = Instant::now();
        let mut cursor = ReplayCursor::new(t);
        cursor.page_end(end(Some(5000), 256));
        assert_eq!(cursor.next(0, WINDOW, t), Some(5000));
        cursor.page_end(end(None, 3));
        // Announced again (Redis lost presence): the first page of what is pending says more.
        cursor.page_end(end(Some(300), 256));
        assert_eq!(cursor.next(0, WINDOW, t), Some(5000));
    }
}
