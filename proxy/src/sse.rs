//! Server-sent events framing, as a model server's stream carries them:
//! finds each event's end (a blank line; LF, CRLF or CR line ends, a
//! separator split across frames found at once) and hands over the event's
//! `data:` payloads. It never copies an event that arrives whole in one
//! frame; one split across frames is carried in a buffer reused for the
//! whole stream and bounded by [`MAX_CARRIED_EVENT`], so an upstream that
//! never ends an event cannot grow memory. What a payload means is the
//! caller's ([`crate::observe`]).
//!
//! Invariant (fuzzed): for events shorter than the bound, the payloads and
//! their order do not depend on how the stream is split into frames.

/// The longest partial SSE event carried between frames. Past it the event
/// is skipped (still forwarded to the client, not classified).
pub const MAX_CARRIED_EVENT: usize = 256 << 10;

/// One stream's framing state.
#[derive(Debug)]
pub struct SseFramer {
    carry: Vec<u8>,
    /// The previous byte ended a line and nothing followed it yet.
    at_line_start: bool,
    /// The previous byte was a CR: a following LF belongs to it.
    after_cr: bool,
    /// The carried event grew past [`MAX_CARRIED_EVENT`]: skip to its end.
    skipping: bool,
}

impl Default for SseFramer {
    fn default() -> Self {
        SseFramer {
            carry: Vec::new(),
            at_line_start: true,
            after_cr: false,
            skipping: false,
        }
    }
}

impl SseFramer {
    /// Feeds one frame; `data` gets the `data:` payload of every event the
    /// frame completes, in order.
    pub fn feed(&mut self, chunk: &[u8], data: &mut impl FnMut(&[u8])) {
        self.feed_events(chunk, &mut |payload: &[u8], _: EventSpan| data(payload));
    }

    /// As [`Self::feed`], with where each payload's event lies in the
    /// frame (for a caller that cuts events out of the stream).
    pub fn feed_events(&mut self, chunk: &[u8], data: &mut impl FnMut(&[u8], EventSpan)) {
        let mut from = 0;
        let mut at = 0;
        while let Some(i) = memchr::memchr2(b'\n', b'\r', chunk.get(at..).unwrap_or_default()) {
            let pos = at + i;
            let byte = chunk.get(pos).copied().unwrap_or(b'\n');
            if pos > at {
                // Line content since the last line end.
                self.at_line_start = false;
                self.after_cr = false;
            }
            at = pos + 1;
            if byte == b'\n' && self.after_cr {
                // The LF of a CRLF: one line end, already counted.
                self.after_cr = false;
                continue;
            }
            self.after_cr = byte == b'\r';
            if !self.at_line_start {
                self.at_line_start = true;
                continue;
            }
            // A blank line: the event ends here.
            let part = chunk.get(from..pos).unwrap_or_default();
            if self.skipping {
                self.skipping = false;
                self.carry.clear();
            } else if self.carry.is_empty() {
                let span = EventSpan {
                    start: Some(from),
                    end: at,
                };
                payloads(part, &mut |d: &[u8]| data(d, span));
            } else {
                self.carry.extend_from_slice(part);
                let span = EventSpan {
                    start: None,
                    end: at,
                };
                payloads(&self.carry, &mut |d: &[u8]| data(d, span));
                self.carry.clear();
            }
            from = at;
        }
        if at < chunk.len() {
            // Line content after the frame's last line end: the next line
            // end closes that line, not the event.
            self.at_line_start = false;
            self.after_cr = false;
        }
        let rest = chunk.get(from..).unwrap_or_default();
        if self.skipping || rest.is_empty() {
            return;
        }
        if self.carry.len() + rest.len() > MAX_CARRIED_EVENT {
            tracing::debug!("an SSE event longer than {MAX_CARRIED_EVENT} bytes: not observed");
            self.carry = Vec::new();
            self.skipping = true;
            return;
        }
        // Exact: the bound is on memory, not only on the length.
        self.carry.reserve_exact(rest.len());
        self.carry.extend_from_slice(rest);
    }

    /// Whether an event longer than [`MAX_CARRIED_EVENT`] is being passed
    /// over unread.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// The stream ended: an event it left unterminated still counts.
    pub fn finish(&mut self, data: &mut impl FnMut(&[u8])) {
        if !self.carry.is_empty() && !self.skipping {
            payloads(&self.carry, data);
        }
        self.carry = Vec::new();
        self.skipping = false;
    }

    /// Bytes of an unfinished event held now.
    pub fn carried(&self) -> usize {
        self.carry.len()
    }

    /// Memory held for unfinished events.
    pub fn carried_capacity(&self) -> usize {
        self.carry.capacity()
    }
}

/// Where an event a frame completes lies in that frame: from `start` (or,
/// `None`, from bytes carried over from earlier frames) up to `end`, its
/// terminating blank line included. Spans tile the stream (comments and
/// events without data have spans too, unreported): the LF of a CRLF that
/// closes an event is the first byte of the next span, so cutting one span
/// out leaves a well-formed stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSpan {
    pub start: Option<usize>,
    pub end: usize,
}

/// The `data:` lines of one SSE event (any line ends).
fn payloads(event: &[u8], data: &mut impl FnMut(&[u8])) {
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(d) = line.strip_prefix(b"data:") {
            data(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(framer: &mut SseFramer, frames: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for f in frames {
            framer.feed(f, &mut |d: &[u8]| out.push(d.to_vec()));
        }
        out
    }

    #[test]
    fn every_separator_kind_split_anywhere() {
        let stream =
            b"data: a\n\ndata: b\r\n\r\ndata:c\r\rdata: d\n\r\n: comment\n\ndata: [DONE]\n\n";
        for cut in 0..=stream.len() {
            let (x, y) = stream.split_at(cut);
            let got = all(&mut SseFramer::default(), &[x, y]);
            let want: Vec<Vec<u8>> = ["a", "b", "c", "d", "[DONE]"]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect();
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn spans_cover_each_event_with_its_separator() {
        // (event with its separator, its payload if it has one)
        let events: [(&[u8], Option<&[u8]>); 4] = [
            (b"data: a\n\n", Some(b"a")),
            (b": c\r\n\r\n", None),
            (b"data: b\r\r", Some(b"b")),
            (b"data: [DONE]\n\n", Some(b"[DONE]")),
        ];
        let stream: Vec<u8> = events.iter().flat_map(|(e, _)| e.iter().copied()).collect();
        for cut in 0..=stream.len() {
            let (x, y) = stream.split_at(cut);
            let mut f = SseFramer::default();
            let mut got = Vec::new();
            for (offset, frame) in [(0, x), (cut, y)] {
                f.feed_events(frame, &mut |d: &[u8], span: EventSpan| {
                    got.push((
                        d.to_vec(),
                        span.start.map(|s| s + offset),
                        span.end + offset,
                    ));
                });
            }
            // Spans tile the stream: an event ends with the first byte of
            // its blank line's end, so the LF of a closing CRLF starts the
            // next span.
            let mut want = Vec::new();
            let mut at = 0;
            let mut offset = 0;
            for (event, payload) in events {
                let start = at;
                offset += event.len();
                let end = offset - usize::from(event.ends_with(b"\r\n"));
                at = end;
                if let Some(p) = payload {
                    // The start is known when the event lies in one frame.
                    let whole = start >= cut || end <= cut;
                    want.push((p.to_vec(), whole.then_some(start), end));
                }
            }
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn a_line_cut_by_a_frame_end_does_not_end_its_event() {
        // Before: a frame ending inside a line left the framer at a line
        // start, so the line's own end read as a blank line.
        let got = all(&mut SseFramer::default(), &[b"data: a", b"\ndata: b\n\n"]);
        assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
        let mut f = SseFramer::default();
        let mut ends = Vec::new();
        f.feed_events(b"data: a", &mut |_: &[u8], s: EventSpan| ends.push(s.end));
        f.feed_events(b"\ndata: b\n\n", &mut |_: &[u8], s: EventSpan| {
            ends.push(s.end)
        });
        assert_eq!(ends, vec![10, 10], "one event, ending at its blank line");
    }

    #[test]
    fn an_unterminated_event_counts_at_the_end() {
        let mut f = SseFramer::default();
        assert!(all(&mut f, &[b"data: x\n"]).is_empty());
        let mut out = Vec::new();
        f.finish(&mut |d: &[u8]| out.push(d.to_vec()));
        assert_eq!(out, vec![b"x".to_vec()]);
        assert_eq!(f.carried(), 0);
    }
}
