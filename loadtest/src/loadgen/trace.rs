//! Request traces turned into an arrival plan: the Azure LLM inference
//! trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`) and the JSON-lines
//! traces published by Mooncake (`timestamp` in ms, `input_length`,
//! `output_length`; other keys such as `hash_ids` are ignored).
//!
//! Timestamps are wall-clock (`2023-11-16 18:17:03.9799600`, 100 ns
//! resolution; a zone such as the Azure 2024 files' `+00:00` is honoured);
//! only their differences matter. CSV columns are found by name. A bad row
//! stops the load with its line number: a silently skipped row would change
//! the load shape. Rows out of time order are replayed in order, with a
//! warning: each is still a request at its time. Files are streamed, never
//! read whole.

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use super::arrivals::Arrival;

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    Row {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: no requests in the trace")]
    Empty { path: String },
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fraction][zone]` (a `T` may stand for the
/// space; the zone is `Z` or `±HH[:MM]`, as in `2024-05-10
/// 00:00:00.009930+00:00`) into nanoseconds since the Unix epoch (UTC,
/// proleptic Gregorian). A time without a zone is taken as UTC: only
/// differences matter, and one file keeps one convention.
fn parse_timestamp(s: &str) -> Option<i128> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let (time, offset) = split_zone(time.trim())?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    // Four-digit years: the arithmetic below cannot overflow.
    if !(0..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let m: i64 = t.next()?.parse().ok()?;
    let sec: i64 = t.next()?.parse().ok()?;
    if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..61).contains(&sec) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>().ok()? * 10i64.pow(9 - frac.len() as u32)
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + h * 3600 + m * 60 + sec - offset;
    Some(secs as i128 * 1_000_000_000 + nanos as i128)
}

/// Splits a time of day from its zone designator: the time, and the zone's
/// offset east of UTC in seconds (0 for `Z` or no zone). `None` for a
/// designator that is neither `Z` nor `±HH`, `±HHMM` or `±HH:MM`.
fn split_zone(time: &str) -> Option<(&str, i64)> {
    if let Some(t) = time.strip_suffix(['Z', 'z']) {
        return Some((t.trim_end(), 0));
    }
    let Some(at) = time.rfind(['+', '-']) else {
        return Some((time, 0));
    };
    let (t, zone) = time.split_at(at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let digits = zone.get(1..)?;
    let (h, m) = match digits.split_once(':') {
        Some(hm) => hm,
        None if digits.len() == 4 => digits.split_at_checked(2)?,
        None => (digits, "00"),
    };
    let two = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
    if !two(h) || !two(m) {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 23 || m > 59 {
        return None;
    }
    Some((t.trim_end(), sign * (h * 3600 + m * 60)))
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A trace's time compression must be a number > 0.
fn check_speedup(speedup: f64, path: &str) -> Result<(), TraceError> {
    if speedup.is_finite() && speedup > 0.0 {
        return Ok(());
    }
    Err(TraceError::Row {
        path: path.to_string(),
        line: 0,
        reason: format!("speedup {speedup} must be a number > 0"),
    })
}

/// The Azure trace's three columns, found by name in its header.
struct Columns {
    timestamp: usize,
    context: usize,
    generated: usize,
    count: usize,
}

impl Columns {
    /// Finds the columns in `header` (any order; other columns, such as an
    /// index a dataframe wrote, are ignored). A byte-order mark is skipped.
    fn of(header: &str) -> Result<Columns, String> {
        let names: Vec<&str> = header
            .trim_start_matches('\u{feff}')
            .split(',')
            .map(field)
            .collect();
        let find = |name: &str| {
            names.iter().position(|n| *n == name).ok_or_else(|| {
                format!(
                    "header {header:?} has no {name} column (an Azure LLM trace has TIMESTAMP,ContextTokens,GeneratedTokens)"
                )
            })
        };
        Ok(Columns {
            timestamp: find("TIMESTAMP")?,
            context: find("ContextTokens")?,
            generated: find("GeneratedTokens")?,
            count: names.len(),
        })
    }
}

/// A CSV field without its surrounding blanks and double quotes.
fn field(f: &str) -> &str {
    let f = f.trim();
    f.strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(f)
}

/// A trace read: its arrivals in time order from 0, and how many of its
/// rows were earlier than the row before them (replayed in order; a
/// caller says so).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub arrivals: Vec<Arrival>,
    pub reordered: usize,
}

/// Rows read from a trace: (time in ns, prompt tokens, output tokens), in
/// file order, and where the latest of them is.
#[derive(Default)]
struct Rows {
    rows: Vec<(i128, u32, u32)>,
    /// Rows earlier than the row before them.
    out_of_order: usize,
    /// The latest time and its line.
    latest: Option<(i128, usize)>,
}

impl Rows {
    fn push(&mut self, at: i128, prompt: u32, output: u32, line: usize) {
        if self.rows.last().is_some_and(|(t, _, _)| at < *t) {
            self.out_of_order += 1;
        }
        if self.latest.is_none_or(|(t, _)| at > t) {
            self.latest = Some((at, line));
        }
        self.rows.push((at, prompt, output));
    }

    /// The arrivals, relative to the earliest row and divided by `speedup`.
    /// Rows out of time order are put in order (a request is a request
    /// whatever line it is on); output lengths of 0 are sent as 1 token (a
    /// server cannot generate nothing).
    fn into_trace(mut self, path: &str, speedup: f64) -> Result<Trace, TraceError> {
        if self.out_of_order > 0 {
            self.rows.sort_by_key(|(t, _, _)| *t);
        }
        let Some(start) = self.rows.first().map(|(t, _, _)| *t) else {
            return Err(TraceError::Empty {
                path: path.to_string(),
            });
        };
        if let Some((latest, line)) = self.latest {
            let span = (latest - start) as f64 / 1e9 / speedup;
            if Duration::try_from_secs_f64(span).is_err() {
                return Err(TraceError::Row {
                    path: path.to_string(),
                    line,
                    reason: format!(
                        "its time is too far from the trace's first ({span:e} s at this speedup)"
                    ),
                });
            }
        }
        let arrivals = self
            .rows
            .into_iter()
            .map(|(at, prompt_tokens, output)| Arrival {
                at: Duration::from_secs_f64((at - start) as f64 / 1e9 / speedup),
                prompt_tokens,
                max_tokens: output.max(1),
            })
            .collect();
        Ok(Trace {
            arrivals,
            reordered: self.out_of_order,
        })
    }
}

/// Reads an Azure LLM trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`,
/// the columns found by name), returning arrivals relative to its earliest
/// row and divided by `speedup`. Rows out of time order are replayed in
/// order; output lengths of 0 are sent as 1 token.
pub fn read_trace(reader: impl BufRead, path: &str, speedup: f64) -> Result<Trace, TraceError> {
    let row_error = |line, reason: String| TraceError::Row {
        path: path.to_string(),
        line,
        reason,
    };
    check_speedup(speedup, path)?;
    let mut rows = Rows::default();
    let mut columns: Option<Columns> = None;
    for (index, text) in reader.lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(|e| row_error(line, format!("unreadable: {e}")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let Some(c) = &columns else {
            columns = Some(Columns::of(text).map_err(|reason| row_error(line, reason))?);
            continue;
        };
        let fields: Vec<&str> = text.split(',').map(field).collect();
        if fields.len() != c.count {
            return Err(row_error(
                line,
                format!(
                    "{} fields, expected {} as in the header",
                    fields.len(),
                    c.count
                ),
            ));
        }
        let get = |i: usize| fields.get(i).copied().unwrap_or_default();
        let ts = get(c.timestamp);
        let at = parse_timestamp(ts).ok_or_else(|| {
            row_error(
                line,
                format!("TIMESTAMP {ts:?} is not YYYY-MM-DD HH:MM:SS[.fff][Z|±HH:MM]"),
            )
        })?;
        let whole = |name: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| row_error(line, format!("{name} {v:?} is not a whole number")))
        };
        let prompt_tokens = whole("ContextTokens", get(c.context))?;
        let max_tokens = whole("GeneratedTokens", get(c.generated))?;
        rows.push(at, prompt_tokens, max_tokens, line);
    }
    if columns.is_none() {
        return Err(TraceError::Empty {
            path: path.to_string(),
        });
    }
    rows.into_trace(path, speedup)
}

/// Reads a JSON-lines trace (Mooncake's format): one object per line with
/// `timestamp` (milliseconds, a whole number or not), `input_length` and
/// `output_length`, arrivals relative to the earliest line and divided by
/// `speedup`. Lines out of time order are replayed in order.
pub fn read_jsonl_trace(
    reader: impl BufRead,
    path: &str,
    speedup: f64,
) -> Result<Trace, TraceError> {
    let row_error = |line, reason: String| TraceError::Row {
        path: path.to_string(),
        line,
        reason,
    };
    check_speedup(speedup, path)?;
    let mut rows = Rows::default();
    for (index, text) in reader.lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(|e| row_error(line, format!("unreadable: {e}")))?;
        let text = text.trim().trim_start_matches('\u{feff}');
        if text.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| row_error(line, format!("not a JSON object: {e}")))?;
        let Some(object) = value.as_object() else {
            return Err(row_error(line, "not a JSON object".into()));
        };
        let get = |name: &str| {
            object
                .get(name)
                .ok_or_else(|| row_error(line, format!("no {name:?}")))
        };
        let ms = get("timestamp")?;
        let at = match (ms.as_u64(), ms.as_f64()) {
            (Some(ms), _) => i128::from(ms) * 1_000_000,
            (None, Some(ms)) if ms.is_finite() && (0.0..1e20).contains(&ms) => {
                (ms * 1e6).round() as i128
            }
            _ => {
                return Err(row_error(
                    line,
                    format!("\"timestamp\" is {ms}, not a number of milliseconds ≥ 0"),
                ));
            }
        };
        let to_u32 = |name: &str| -> Result<u32, TraceError> {
            let v = get(name)?;
            let n = v.as_u64().ok_or_else(|| {
                row_error(line, format!("{name:?} is {v}, not a whole number ≥ 0"))
            })?;
            u32::try_from(n).map_err(|_| row_error(line, format!("{name:?} {n} is too large")))
        };
        let prompt_tokens = to_u32("input_length")?;
        let max_tokens = to_u32("output_length")?;
        rows.push(at, prompt_tokens, max_tokens, line);
    }
    rows.into_trace(path, speedup)
}

/// Reads a trace file of either format: JSON lines when its first
/// non-blank character (after a byte-order mark) is `{`, the Azure CSV
/// otherwise. The file is streamed, never read whole: a week of requests is
/// gigabytes.
pub fn read_any_trace_file(path: &Path, speedup: f64) -> Result<Trace, TraceError> {
    let name = path.display().to_string();
    let open_error = |source| TraceError::Open {
        path: name.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_error)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let json = loop {
        let buf = reader.fill_buf().map_err(open_error)?;
        let Some(&b) = buf.first() else {
            break false;
        };
        let skip = if b.is_ascii_whitespace() {
            1
        } else if buf.starts_with("\u{feff}".as_bytes()) {
            3
        } else {
            break b == b'{';
        };
        reader.consume(skip);
    };
    if json {
        read_jsonl_trace(reader, &name, speedup)
    } else {
        read_trace(reader, &name, speedup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, speedup: f64) -> Result<Vec<Arrival>, TraceError> {
        read_trace(text.as_bytes(), "t.csv", speedup).map(|t| t.arrivals)
    }

    #[test]
    fn timestamps_are_exact() {
        let a = parse_timestamp("2023-11-16 18:17:03.9799600").unwrap();
        let b = parse_timestamp("2023-11-16 18:17:04.0319600").unwrap();
        assert_eq!(b - a, 52_000_000);
        // Across midnight and a month end.
        let c = parse_timestamp("2023-11-30 23:59:59.5").unwrap();
        let d = parse_timestamp("2023-12-01 00:00:00.25").unwrap();
        assert_eq!(d - c, 750_000_000);
        assert_eq!(parse_timestamp("1970-01-01 00:00:01"), Some(1_000_000_000));
    }

    #[test]
    fn rows_become_arrivals_with_speedup() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 18:17:03.0,4808,10\n\
                    2023-11-16 18:17:05.0,3180,0\n";
        let a = read(text, 2.0).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[0],
            Arrival {
                at: Duration::ZERO,
                prompt_tokens: 4808,
                max_tokens: 10
            }
        );
        assert_eq!(a[1].at, Duration::from_secs(1));
        assert_eq!(a[1].max_tokens, 1);
    }

    #[test]
    fn bad_rows_name_their_line() {
        let header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        for (body, needle) in [
            ("2023-11-16 18:17:03.0,12\n", "line 2: 2 fields"),
            (
                "2023-11-16 18:17:03.0,1,1\nnot-a-date,1,1\n",
                "line 3: TIMESTAMP",
            ),
            ("2023-11-16 18:17:03.0,-4,1\n", "line 2: ContextTokens"),
            ("2023-11-16 18:17:03.0,4,x\n", "line 2: GeneratedTokens"),
            (
                "2023-11-16 18:17:03.0,4,1\n2023-11-16 18:17:02.0+01:3,4,1\n",
                "line 3: TIMESTAMP \"2023-11-16 18:17:02.0+01:3\"",
            ),
            ("2023-13-16 18:17:03.0,4,1\n", "line 2"),
        ] {
            let err = read(&format!("{header}{body}"), 1.0)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
            assert!(err.starts_with("t.csv: "), "{err}");
        }
        let err = read("time,a,b\n", 1.0).unwrap_err().to_string();
        assert!(err.contains("line 1: header"), "{err}");
        assert!(matches!(read(header, 1.0), Err(TraceError::Empty { .. })));
        assert!(read(header, 0.0).is_err());
    }

    #[test]
    fn the_shipped_traces_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
        for (name, rows) in [
            ("azure-llm-2023-code.csv", 8_819),
            ("azure-llm-2023-conv.csv", 19_366),
        ] {
            let a = read_any_trace_file(&dir.join(name), 60.0).unwrap().arrivals;
            assert_eq!(a.len(), rows, "{name}");
            // One hour at 60× is about a minute.
            let span = a.last().unwrap().at;
            assert!(
                span > Duration::from_secs(50) && span < Duration::from_secs(61),
                "{name}: {span:?}"
            );
        }
    }
    #[test]
    fn mooncake_json_lines_are_read_and_bad_lines_named() {
        let text = "{\"timestamp\": 0, \"input_length\": 6955, \"output_length\": 52, \"hash_ids\": [1, 2]}\n\
                    {\"timestamp\": 1500, \"input_length\": 10, \"output_length\": 0}\n";
        let a = read_jsonl_trace(text.as_bytes(), "m.jsonl", 1.0)
            .unwrap()
            .arrivals;
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].prompt_tokens, 6955);
        assert_eq!(a[0].max_tokens, 52);
        assert_eq!(a[1].at, Duration::from_millis(1500));
        assert_eq!(a[1].max_tokens, 1);
        for (body, needle) in [
            ("[1,2]\n", "line 1: not a JSON object"),
            ("{\"timestamp\": 1}\n", "line 1: no \"input_length\""),
            (
                "{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1}\n",
                "\"timestamp\" is -1",
            ),
            (
                "{\"timestamp\": \"5\", \"input_length\": 1, \"output_length\": 1}\n",
                "\"timestamp\" is \"5\"",
            ),
            (
                "{\"timestamp\": 5, \"input_length\": 99999999999, \"output_length\": 1}\n",
                "too large",
            ),
        ] {
            let err = read_jsonl_trace(body.as_bytes(), "m.jsonl", 1.0)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
        // Stretched past what a duration holds: an error, not a panic.
        let far = "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n{\"timestamp\": 18000000000000000000, \"input_length\": 1, \"output_length\": 1}\n";
        let err = read_jsonl_trace(far.as_bytes(), "m.jsonl", 1e-9)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2: its time is too far"), "{err}");
        // Milliseconds with a fraction, and lines out of order: replayed in
        // time order, from the earliest.
        let text = "{\"timestamp\": 2000.5, \"input_length\": 3, \"output_length\": 1}\n\
                    {\"timestamp\": 1000, \"input_length\": 1, \"output_length\": 1}\n\
                    {\"timestamp\": 1500, \"input_length\": 2, \"output_length\": 1}\n";
        let t = read_jsonl_trace(text.as_bytes(), "m.jsonl", 1.0).unwrap();
        assert_eq!(t.reordered, 1);
        let a = t.arrivals;
        let got: Vec<_> = a.iter().map(|r| (r.at, r.prompt_tokens)).collect();
        assert_eq!(
            got,
            [
                (Duration::ZERO, 1),
                (Duration::from_millis(500), 2),
                (Duration::from_micros(1_000_500), 3)
            ]
        );
    }

    #[test]
    fn zones_and_t_separators_are_read() {
        let utc = parse_timestamp("2024-05-10 00:00:00.009930").unwrap();
        for (text, shift_s) in [
            ("2024-05-10 00:00:00.009930+00:00", 0),
            ("2024-05-10T00:00:00.009930Z", 0),
            ("2024-05-10 00:00:00.009930 +00:00", 0),
            ("2024-05-10 02:00:00.009930+02:00", 0),
            ("2024-05-09 19:30:00.009930-0430", 0),
            ("2024-05-10 00:00:00.009930+01", -3600),
        ] {
            let at = parse_timestamp(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(at - utc, shift_s * 1_000_000_000, "{text}");
        }
        for bad in [
            "2024-05-10 00:00:00+1:00",
            "2024-05-10 00:00:00+24:00",
            "2024-05-10 00:00:00+00:60",
            "2024-05-10 00:00:00+",
            "2024-05-10 00:00:00+00:00:00",
            "2024-05-10 00:00:00.5+0x:00",
            "9223372036854775807-01-01 00:00:00",
            "-5-01-01 00:00:00",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn columns_are_found_by_name_and_rows_put_in_order() {
        // A byte-order mark, an index column a dataframe wrote, another
        // order, quotes, zones, and a row earlier than the one before.
        let text = "\u{feff}\"\",GeneratedTokens,TIMESTAMP,ContextTokens\n\
                    0,10,2024-05-10 00:00:02.0+00:00,300\n\
                    1,0,\"2024-05-10 00:00:01.0+00:00\",200\n\
                    2,7,2024-05-10 02:00:03.5+02:00,100\n";
        let t = read_trace(text.as_bytes(), "t.csv", 1.0).unwrap();
        assert_eq!(t.reordered, 1);
        let got: Vec<_> = t
            .arrivals
            .iter()
            .map(|r| (r.at, r.prompt_tokens, r.max_tokens))
            .collect();
        assert_eq!(
            got,
            [
                (Duration::ZERO, 200, 1),
                (Duration::from_secs(1), 300, 10),
                (Duration::from_millis(2500), 100, 7)
            ]
        );
        let err = read("TIMESTAMP,ContextTokens\n", 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1: header") && err.contains("no GeneratedTokens column"),
            "{err}"
        );
        // Blank lines before the header are skipped, not taken for it.
        let a = read(
            "\n\nTIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,3,4\n",
            1.0,
        )
        .unwrap();
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn either_format_is_recognised_by_its_first_character() {
        let dir = std::env::temp_dir().join(format!("scalecar-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("t.jsonl");
        std::fs::write(
            &json,
            "\n {\"timestamp\": 0, \"input_length\": 3, \"output_length\": 4}\n",
        )
        .unwrap();
        let marked = dir.join("marked.jsonl");
        std::fs::write(
            &marked,
            "\u{feff}{\"timestamp\": 0, \"input_length\": 3, \"output_length\": 4}\n",
        )
        .unwrap();
        let csv = dir.join("t.csv");
        std::fs::write(
            &csv,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,3,4\n",
        )
        .unwrap();
        for p in [&json, &marked, &csv] {
            let a = read_any_trace_file(p, 1.0).unwrap().arrivals;
            assert_eq!(
                (a[0].prompt_tokens, a[0].max_tokens),
                (3, 4),
                "{}",
                p.display()
            );
        }
        assert!(read_any_trace_file(&dir.join("missing"), 1.0).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
