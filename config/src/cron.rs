//! Schedule floors: `scalecar.io/schedule` entries such as
//! `0 9 * * 1-5 for 10h min 4` — a five-field cron (UTC) for when a window
//! opens, how long it stays open, and the least replica count inside it.

use std::time::Duration;

use crate::policy::{Cron, CronField, ScheduleFloor};

/// The longest window a floor may hold (a week: longer ones are a min
/// replica count, not a schedule).
pub const MAX_FLOOR_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn field(text: &str, name: &str, lo: u32, hi: u32) -> Result<CronField, String> {
    let mut mask = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{name} step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{name} step must be at least 1"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u32 = a
                .parse()
                .map_err(|_| format!("{name} {a:?} is not a number"))?;
            let b: u32 = b
                .parse()
                .map_err(|_| format!("{name} {b:?} is not a number"))?;
            (a, b)
        } else {
            let a: u32 = range
                .parse()
                .map_err(|_| format!("{name} {range:?} is not a number"))?;
            // `5/15` means 5, 20, 35, 50 as in Vixie cron.
            (a, if part.contains('/') { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{name} {range:?} is outside {lo}-{hi}"));
        }
        let mut v = a;
        while v <= b {
            mask |= 1u64 << v;
            v += step;
        }
    }
    Ok(CronField(mask))
}

impl Cron {
    /// Parses `minute hour day-of-month month day-of-week`.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields.as_slice() else {
            return Err(format!(
                "{text:?} has {} fields; a cron has 5 (minute hour day-of-month month day-of-week)",
                fields.len()
            ));
        };
        let mut day_of_week = field(dow, "day-of-week", 0, 7)?;
        // 7 is Sunday too.
        if day_of_week.contains(7) {
            day_of_week.0 = (day_of_week.0 & !(1 << 7)) | 1;
        }
        Ok(Cron {
            minute: field(minute, "minute", 0, 59)?,
            hour: field(hour, "hour", 0, 23)?,
            day_of_month: field(dom, "day-of-month", 1, 31)?,
            month: field(month, "month", 1, 12)?,
            day_of_week,
            source: fields.join(" "),
        })
    }

    fn day_matches(&self, days_since_epoch: i64) -> bool {
        let (_, month, day) = civil_from_days(days_since_epoch);
        // 1970-01-01 was a Thursday (4).
        let weekday = (days_since_epoch + 4).rem_euclid(7) as u32;
        if !self.month.contains(month) {
            return false;
        }
        let dom_any = self.day_of_month.0 == field_all(1, 31);
        let dow_any = self.day_of_week.0 == field_all(0, 6);
        match (dom_any, dow_any) {
            // Both restricted: either matching suffices, as in cron.
            (false, false) => self.day_of_month.contains(day) || self.day_of_week.contains(weekday),
            (true, false) => self.day_of_week.contains(weekday),
            (false, true) => self.day_of_month.contains(day),
            (true, true) => true,
        }
    }

    /// Whether the cron fires at the minute starting at `unix_minute × 60`.
    pub fn fires_at(&self, unix_minute: u64) -> bool {
        let days = (unix_minute / 1440) as i64;
        let minute_of_day = (unix_minute % 1440) as u32;
        self.day_matches(days)
            && self.hour.contains(minute_of_day / 60)
            && self.minute.contains(minute_of_day % 60)
    }

    /// The latest firing minute at or before `unix_minute` and not before
    /// `earliest_minute`, walking back day by day over matching days only.
    pub fn last_firing(&self, unix_minute: u64, earliest_minute: u64) -> Option<u64> {
        let mut day = unix_minute / 1440;
        let first_day = earliest_minute / 1440;
        loop {
            if self.day_matches(day as i64) {
                for hour in (0..24u32).rev() {
                    if !self.hour.contains(hour) {
                        continue;
                    }
                    for minute in (0..60u32).rev() {
                        if !self.minute.contains(minute) {
                            continue;
                        }
                        let t = day * 1440 + u64::from(hour * 60 + minute);
                        if t <= unix_minute {
                            return (t >= earliest_minute).then_some(t);
                        }
                    }
                }
            }
            if day == 0 || day <= first_day {
                return None;
            }
            day -= 1;
        }
    }
}

fn field_all(lo: u32, hi: u32) -> u64 {
    (lo..=hi).fold(0, |m, v| m | 1u64 << v)
}

/// (year, month 1-12, day 1-31) of days since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl ScheduleFloor {
    /// Parses one entry: `<cron> for <duration> min <replicas>`.
    pub fn parse(entry: &str) -> Result<ScheduleFloor, String> {
        let entry = entry.trim();
        let Some((cron, rest)) = entry.split_once(" for ") else {
            return Err(format!(
                "{entry:?} is not `<cron> for <duration> min <replicas>`"
            ));
        };
        let Some((duration, min)) = rest.split_once(" min ") else {
            return Err(format!(
                "{entry:?} is not `<cron> for <duration> min <replicas>`"
            ));
        };
        let cron = Cron::parse(cron)?;
        let duration = humantime::parse_duration(duration.trim())
            .map_err(|e| format!("{:?} is not a duration: {e}", duration.trim()))?;
        if duration.is_zero() || duration > MAX_FLOOR_DURATION {
            return Err(format!("window {duration:?} must be between 1m and 7d"));
        }
        let min_replicas: u32 = min
            .trim()
            .parse()
            .map_err(|_| format!("min {:?} is not a whole number", min.trim()))?;
        Ok(ScheduleFloor {
            cron,
            duration,
            min_replicas,
        })
    }

    /// Parses a `;`-separated list of entries.
    pub fn parse_list(text: &str) -> Result<Vec<ScheduleFloor>, String> {
        text.split(';')
            .filter(|e| !e.trim().is_empty())
            .map(ScheduleFloor::parse)
            .collect()
    }

    /// Whether the window is open at `unix_secs`: the cron fired at some
    /// minute in (t − duration, t].
    pub fn active_at(&self, unix_secs: u64) -> bool {
        let now_minute = unix_secs / 60;
        let span_minutes = self.duration.as_secs().div_ceil(60);
        let earliest = now_minute.saturating_sub(span_minutes);
        match self.cron.last_firing(now_minute, earliest) {
            Some(fired) => fired * 60 + self.duration.as_secs() > unix_secs,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, m: u32, d: u32, h: u64, min: u64) -> u64 {
        // Inverse of civil_from_days, by search from a known day.
        let mut days = 0i64;
        while civil_from_days(days) != (y, m, d) {
            days += 1;
        }
        days as u64 * 86_400 + h * 3600 + min * 60
    }

    #[test]
    fn civil_dates_and_weekdays() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        // 2026-11-22 is a Sunday.
        let t = at(2026, 11, 22, 12, 0);
        let sunday = Cron::parse("0 12 * * 0").unwrap();
        assert!(sunday.fires_at(t / 60));
        assert!(Cron::parse("0 12 * * 7").unwrap().fires_at(t / 60));
        assert!(!Cron::parse("0 12 * * 1-5").unwrap().fires_at(t / 60));
    }

    #[test]
    fn fields_support_lists_ranges_and_steps() {
        let c = Cron::parse("*/15 9-17/4 1,15 * *").unwrap();
        assert_eq!(c.minute.0, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(c.hour.0, 1 << 9 | 1 << 13 | 1 << 17);
        assert_eq!(c.day_of_month.0, 1 << 1 | 1 << 15);
        assert_eq!(
            Cron::parse("5/20 * * * *").unwrap().minute.0,
            1 << 5 | 1 << 25 | 1 << 45
        );
        for bad in [
            "61 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "a * * * *",
            "* * * *",
            "5-1 * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn day_of_month_or_day_of_week() {
        // The 1st of the month or any Monday.
        let c = Cron::parse("0 0 1 * 1").unwrap();
        assert!(c.fires_at(at(2026, 11, 1, 0, 0) / 60)); // a Sunday, the 1st
        assert!(c.fires_at(at(2026, 11, 2, 0, 0) / 60)); // a Monday
        assert!(!c.fires_at(at(2026, 11, 3, 0, 0) / 60));
    }

    #[test]
    fn windows_open_and_close() {
        let f = ScheduleFloor::parse("0 9 * * 1-5 for 10h min 4").unwrap();
        assert_eq!(f.min_replicas, 4);
        let friday = |h, m| at(2026, 11, 20, h, m);
        assert!(!f.active_at(friday(8, 59)));
        assert!(f.active_at(friday(9, 0)));
        assert!(f.active_at(friday(18, 59)));
        assert!(!f.active_at(friday(19, 0)));
        // Saturday: no window.
        assert!(!f.active_at(at(2026, 11, 21, 10, 0)));
    }

    #[test]
    fn windows_cross_midnight_and_the_week() {
        let f = ScheduleFloor::parse("0 22 * * 0 for 4h min 2").unwrap();
        assert!(f.active_at(at(2026, 11, 22, 23, 30))); // Sunday night
        assert!(f.active_at(at(2026, 11, 23, 1, 59))); // Monday early
        assert!(!f.active_at(at(2026, 11, 23, 2, 0)));
        let weekend = ScheduleFloor::parse("0 0 * * 6 for 48h min 3").unwrap();
        assert!(weekend.active_at(at(2026, 11, 22, 23, 59)));
        assert!(!weekend.active_at(at(2026, 11, 23, 0, 0)));
    }

    #[test]
    fn bad_entries_say_why() {
        for (bad, needle) in [
            ("0 9 * * 1-5 min 4", "is not `<cron>"),
            ("0 9 * * 1-5 for 10h", "is not `<cron>"),
            ("0 9 * * 1-5 for ten hours min 4", "is not a duration"),
            ("0 9 * * 1-5 for 10h min x", "is not a whole number"),
            ("0 9 * * 1-5 for 30d min 1", "between 1m and 7d"),
            ("0 99 * * 1-5 for 1h min 1", "outside 0-23"),
        ] {
            let e = ScheduleFloor::parse(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        assert_eq!(
            ScheduleFloor::parse_list("0 9 * * * for 1h min 1; 0 12 * * * for 1h min 2")
                .unwrap()
                .len(),
            2
        );
    }
}
