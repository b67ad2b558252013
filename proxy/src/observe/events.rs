//! What one SSE event (or a whole JSON answer) of an OpenAI-compatible
//! stream says: a generated token (content, text, reasoning or a tool-call
//! delta), usage, the end, or nothing of interest — read in place with
//! prebuilt searchers, no parse and no allocation.

use std::sync::LazyLock;

use memchr::memmem::Finder;

pub(super) enum Event {
    /// A generated token; `finished` if the event also carries a
    /// `finish_reason`.
    Token {
        finished: bool,
    },
    Usage(Usage),
    /// `[DONE]` or a `finish_reason` without a token.
    Finished,
    Other,
}

/// What a usage object counted (either may be absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Usage {
    pub completion: Option<u64>,
    pub prompt: Option<u64>,
}

impl Usage {
    /// The counts in `hay` (an event, or a whole JSON answer).
    pub(super) fn of(hay: &[u8]) -> Usage {
        let needles = &*NEEDLES;
        Usage {
            completion: number_after(&needles.completion_tokens, hay),
            prompt: number_after(&needles.prompt_tokens, hay),
        }
    }
}

/// The needles, each searcher built once (building one per search cost as
/// much as the search).
struct Needles {
    completion_tokens: Finder<'static>,
    prompt_tokens: Finder<'static>,
    empty_choices: [Finder<'static>; 2],
    /// String fields whose non-empty value is a generated token: content
    /// (chat), text (completions), reasoning_content / reasoning (vLLM's
    /// reasoning parsers).
    token_strings: [Finder<'static>; 8],
    tool_calls: [Finder<'static>; 2],
    finish_reason: [Finder<'static>; 2],
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    completion_tokens: Finder::new(b"\"completion_tokens\":"),
    prompt_tokens: Finder::new(b"\"prompt_tokens\":"),
    empty_choices: [
        Finder::new(b"\"choices\":[]"),
        Finder::new(b"\"choices\": []"),
    ],
    token_strings: [
        Finder::new(b"\"content\":\""),
        Finder::new(b"\"content\": \""),
        Finder::new(b"\"text\":\""),
        Finder::new(b"\"text\": \""),
        Finder::new(b"\"reasoning_content\":\""),
        Finder::new(b"\"reasoning_content\": \""),
        Finder::new(b"\"reasoning\":\""),
        Finder::new(b"\"reasoning\": \""),
    ],
    tool_calls: [
        Finder::new(b"\"tool_calls\":[{"),
        Finder::new(b"\"tool_calls\": [{"),
    ],
    finish_reason: [
        Finder::new(b"\"finish_reason\":\""),
        Finder::new(b"\"finish_reason\": \""),
    ],
});

/// The number after `key` (e.g. `"completion_tokens":`) in `hay`; `None`
/// also when its digits run to the end of `hay` (a frame may end inside
/// the number: the rest is in the next one).
fn number_after(key: &Finder<'_>, hay: &[u8]) -> Option<u64> {
    let at = key.find(hay)? + key.needle().len();
    let rest = hay.get(at..)?;
    let start = rest.iter().position(|b| *b != b' ')?;
    let digits = rest.get(start..)?;
    let len = digits.iter().position(|b| !b.is_ascii_digit())?;
    if len == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for d in digits.get(..len)? {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(n)
}

/// The most bytes a usage count spans (key, spaces, digits, the byte after).
const USAGE_SPAN: usize = 64;

/// Reads the usage of a whole JSON answer as it arrives in frames, also
/// where a count straddles two frames (or many small ones): the last
/// [`USAGE_SPAN`] bytes seen are kept, inline, and searched together with
/// the start of the next frame.
#[derive(Debug)]
pub(super) struct JsonUsageScan {
    seam: [u8; 2 * USAGE_SPAN],
    len: usize,
}

impl Default for JsonUsageScan {
    fn default() -> Self {
        JsonUsageScan {
            seam: [0; 2 * USAGE_SPAN],
            len: 0,
        }
    }
}

impl JsonUsageScan {
    /// The counts that `chunk` completes.
    pub(super) fn feed(&mut self, chunk: &[u8]) -> Usage {
        // Only a seam with earlier bytes can hold what the chunk alone does
        // not (a first frame, most answers' only one, is searched once).
        let across = if self.len == 0 {
            Usage::default()
        } else {
            let head = chunk.get(..chunk.len().min(USAGE_SPAN)).unwrap_or_default();
            let joint = self.len + head.len();
            if let Some(room) = self.seam.get_mut(self.len..joint) {
                room.copy_from_slice(head);
                self.len = joint;
            }
            Usage::of(self.seam.get(..self.len).unwrap_or_default())
        };
        let within = Usage::of(chunk);
        // Keep the last USAGE_SPAN bytes of all seen: the chunk's own, or
        // (a short chunk, all of it in the seam) the seam's.
        if chunk.len() >= USAGE_SPAN {
            let last = chunk.get(chunk.len() - USAGE_SPAN..).unwrap_or_default();
            if let Some(keep) = self.seam.get_mut(..USAGE_SPAN) {
                keep.copy_from_slice(last);
                self.len = USAGE_SPAN;
            }
        } else if self.len == 0 {
            // A short first frame: all of it is the seam.
            if let Some(keep) = self.seam.get_mut(..chunk.len()) {
                keep.copy_from_slice(chunk);
                self.len = chunk.len();
            }
        } else {
            let from = self.len.saturating_sub(USAGE_SPAN);
            self.seam.copy_within(from..self.len, 0);
            self.len -= from;
        }
        Usage {
            completion: within.completion.or(across.completion),
            prompt: within.prompt.or(across.prompt),
        }
    }
}

/// A token event carries a non-empty content, text or reasoning string, or
/// a tool-call delta; a usage event has `"choices":[]`.
pub(super) fn classify(data: &[u8]) -> Event {
    if data == b"[DONE]" {
        return Event::Finished;
    }
    let needles = &*NEEDLES;
    if needles.empty_choices.iter().any(|f| f.find(data).is_some()) {
        return Event::Usage(Usage::of(data));
    }
    let finished = needles.finish_reason.iter().any(|f| f.find(data).is_some());
    let string_token = needles.token_strings.iter().any(|key| {
        key.find(data).is_some_and(|at| {
            data.get(at + key.needle().len())
                .is_some_and(|b| *b != b'"')
        })
    });
    if string_token || needles.tool_calls.iter().any(|f| f.find(data).is_some()) {
        return Event::Token { finished };
    }
    if finished {
        Event::Finished
    } else {
        Event::Other
    }
}
