//! Request traces turned into an arrival plan: the Azure LLM inference
//! trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`) and the JSON-lines
//! traces published by Mooncake (`timestamp` in ms, `input_length`,
//! `output_length`; other keys such as `hash_ids` are ignored).
//!
//! Timestamps are wall-clock (`2023-11-16 18:17:03.9799600`, 100 ns
//! resolution); only their differences matter. A bad row stops the load with
//! its line number: a silently skipped row would change the load shape.

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

/// Parses `YYYY-MM-DD HH:MM:SS[.fraction]` into nanoseconds since the Unix
/// epoch (UTC, proleptic Gregorian).
fn parse_timestamp(s: &str) -> Option<i128> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
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
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    Some(secs as i128 * 1_000_000_000 + nanos as i128)
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

/// Reads a trace, returning arrivals relative to its first row and divided
/// by `speedup`. Rows must not go back in time. Output lengths of 0 are sent
/// as 1 token (a server cannot generate nothing).
pub fn read_trace(
    reader: impl BufRead,
    path: &str,
    speedup: f64,
) -> Result<Vec<Arrival>, TraceError> {
    let row_error = |line, reason: String| TraceError::Row {
        path: path.to_string(),
        line,
        reason,
    };
    check_speedup(speedup, path)?;
    let mut out = Vec::new();
    let mut first: Option<i128> = None;
    let mut previous: Option<i128> = None;
    for (index, text) in reader.lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(|e| row_error(line, format!("unreadable: {e}")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if line == 1 {
            let header: Vec<_> = text.split(',').map(str::trim).collect();
            if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"] {
                return Err(row_error(
                    line,
                    format!("header {text:?} is not TIMESTAMP,ContextTokens,GeneratedTokens"),
                ));
            }
            continue;
        }
        let fields: Vec<_> = text.split(',').map(str::trim).collect();
        let [ts, context, generated] = fields.as_slice() else {
            return Err(row_error(
                line,
                format!("{} fields, expected 3", fields.len()),
            ));
        };
        let at = parse_timestamp(ts).ok_or_else(|| {
            row_error(
                line,
                format!("TIMESTAMP {ts:?} is not YYYY-MM-DD HH:MM:SS.fff"),
            )
        })?;
        let prompt_tokens: u32 = context.parse().map_err(|_| {
            row_error(
                line,
                format!("ContextTokens {context:?} is not a whole number"),
            )
        })?;
        let max_tokens: u32 = generated.parse().map_err(|_| {
            row_error(
                line,
                format!("GeneratedTokens {generated:?} is not a whole number"),
            )
        })?;
        if let Some(prev) = previous
            && at < prev
        {
            return Err(row_error(
                line,
                format!("TIMESTAMP {ts} is earlier than the row before"),
            ));
        }
        previous = Some(at);
        let start = *first.get_or_insert(at);
        let offset_ns = (at - start) as f64 / speedup;
        out.push(Arrival {
            at: Duration::from_nanos(offset_ns as u64),
            prompt_tokens,
            max_tokens: max_tokens.max(1),
        });
    }
    if out.is_empty() {
        return Err(TraceError::Empty {
            path: path.to_string(),
        });
    }
    Ok(out)
}

/// Reads a trace file (see [`read_trace`]).
pub fn read_trace_file(path: &Path, speedup: f64) -> Result<Vec<Arrival>, TraceError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TraceError::Open {
        path: name.clone(),
        source,
    })?;
    read_trace(std::io::BufReader::new(file), &name, speedup)
}

/// Reads a JSON-lines trace (Mooncake's format): one object per line with
/// `timestamp` (milliseconds, never decreasing), `input_length` and
/// `output_length`, arrivals relative to the first line and divided by
/// `speedup`.
pub fn read_jsonl_trace(
    reader: impl BufRead,
    path: &str,
    speedup: f64,
) -> Result<Vec<Arrival>, TraceError> {
    let row_error = |line, reason: String| TraceError::Row {
        path: path.to_string(),
        line,
        reason,
    };
    check_speedup(speedup, path)?;
    let mut out = Vec::new();
    let mut first: Option<u64> = None;
    let mut previous = 0u64;
    for (index, text) in reader.lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(|e| row_error(line, format!("unreadable: {e}")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| row_error(line, format!("not a JSON object: {e}")))?;
        let Some(object) = value.as_object() else {
            return Err(row_error(line, "not a JSON object".into()));
        };
        let field = |name: &str| -> Result<u64, TraceError> {
            match object.get(name) {
                None => Err(row_error(line, format!("no {name:?}"))),
                Some(v) => v.as_u64().ok_or_else(|| {
                    row_error(line, format!("{name:?} is {v}, not a whole number ≥ 0"))
                }),
            }
        };
        let at = field("timestamp")?;
        let to_u32 = |name: &str| -> Result<u32, TraceError> {
            let v = field(name)?;
            u32::try_from(v).map_err(|_| row_error(line, format!("{name:?} {v} is too large")))
        };
        let prompt_tokens = to_u32("input_length")?;
        let max_tokens = to_u32("output_length")?;
        if at < previous {
            return Err(row_error(
                line,
                format!("timestamp {at} is earlier than the line before ({previous})"),
            ));
        }
        previous = at;
        let start = *first.get_or_insert(at);
        let offset_ms = (at - start) as f64 / speedup;
        let at = Duration::try_from_secs_f64(offset_ms / 1000.0).map_err(|_| {
            row_error(
                line,
                format!("timestamp {at} is too far from the first line ({start} ms)"),
            )
        })?;
        out.push(Arrival {
            at,
            prompt_tokens,
            max_tokens: max_tokens.max(1),
        });
    }
    if out.is_empty() {
        return Err(TraceError::Empty {
            path: path.to_string(),
        });
    }
    Ok(out)
}

/// Reads a trace file of either format: JSON lines when its first
/// non-blank character is `{`, the Azure CSV otherwise.
pub fn read_any_trace_file(path: &Path, speedup: f64) -> Result<Vec<Arrival>, TraceError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TraceError::Open {
        path: name.clone(),
        source,
    })?;
    let json = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if json {
        read_jsonl_trace(bytes.as_slice(), &name, speedup)
    } else {
        read_trace(bytes.as_slice(), &name, speedup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, speedup: f64) -> Result<Vec<Arrival>, TraceError> {
        read_trace(text.as_bytes(), "t.csv", speedup)
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
                "2023-11-16 18:17:03.0,4,1\n2023-11-16 18:17:02.0,4,1\n",
                "line 3: TIMESTAMP 2023-11-16 18:17:02.0 is earlier",
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
            let a = read_trace_file(&dir.join(name), 60.0).unwrap();
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
        let a = read_jsonl_trace(text.as_bytes(), "m.jsonl", 1.0).unwrap();
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
                "{\"timestamp\": 5, \"input_length\": 1, \"output_length\": 1}\n{\"timestamp\": 4, \"input_length\": 1, \"output_length\": 1}\n",
                "line 2: timestamp 4 is earlier",
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
        assert!(
            err.contains("line 2: timestamp 18000000000000000000 is too far"),
            "{err}"
        );
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
        let csv = dir.join("t.csv");
        std::fs::write(
            &csv,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,3,4\n",
        )
        .unwrap();
        for p in [&json, &csv] {
            let a = read_any_trace_file(p, 1.0).unwrap();
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
