//! The `schedule` property: a bandwidth timetable in the daemon's local
//! time, written as rclone's `--bwlimit` takes one: `08:00,50M 19:00,off`
//! limits the copy to 50 MB/s from 8 in the morning and lifts the limit
//! at 7 in the evening, every day. Before the first time of the day the
//! last entry (from the day before) holds. A migration with a schedule
//! follows it instead of its `rate`; the supervisor applies a change
//! within a second of the time it names.

use std::str::FromStr;

use dmm_control::{ValueError, parse_size};

/// A timetable of copy rates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// (minute of the day, rate in bytes/s or `None` for no limit), by
    /// minute, at least one.
    entries: Vec<(u16, Option<u64>)>,
}

const EXAMPLE: &str = "e.g. 08:00,50M 19:00,off (HH:MM,RATE; RATE 0 or off: no limit)";

impl FromStr for Schedule {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Schedule, ValueError> {
        let bad = || ValueError::new("a timetable", text, EXAMPLE);
        let mut entries: Vec<(u16, Option<u64>)> = Vec::new();
        for entry in text.split_whitespace() {
            let (time, rate) = entry.split_once(',').ok_or_else(bad)?;
            let (hours, minutes) = time.split_once(':').ok_or_else(bad)?;
            let (hours, minutes): (u16, u16) = match (hours.parse(), minutes.parse()) {
                (Ok(h), Ok(m)) if h < 24 && m < 60 && minutes.len() == 2 => (h, m),
                _ => return Err(bad()),
            };
            let rate = match rate {
                "off" => None,
                size => Some(parse_size(size).map_err(|_| bad())?).filter(|&r| r > 0),
            };
            let minute = hours * 60 + minutes;
            if entries.last().is_some_and(|&(last, _)| last >= minute) {
                return Err(ValueError::new("a timetable in time order", text, EXAMPLE));
            }
            entries.push((minute, rate));
        }
        if entries.is_empty() {
            return Err(bad());
        }
        Ok(Schedule { entries })
    }
}

impl Schedule {
    /// The rate at `minute` of the day (`None`: no limit).
    pub fn rate_at(&self, minute: u16) -> Option<u64> {
        let current = self
            .entries
            .iter()
            .rev()
            .find(|&&(from, _)| from <= minute)
            .or(self.entries.last());
        current.and_then(|&(_, rate)| rate)
    }

    /// The rate now, in the daemon's local time zone.
    pub fn rate_now(&self) -> Option<u64> {
        self.rate_at(minute_now())
    }
}

/// The minute of the day now, in the daemon's local time zone.
pub fn minute_now() -> u16 {
    let now = jiff::Zoned::now();
    now.hour() as u16 * 60 + now.minute() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_in_force_is_the_last_one_started_wrapping_over_midnight() {
        let schedule: Schedule = "08:00,50M 12:30,1G 19:00,off".parse().unwrap();
        assert_eq!(schedule.rate_at(8 * 60), Some(50 << 20));
        assert_eq!(schedule.rate_at(12 * 60 + 29), Some(50 << 20));
        assert_eq!(schedule.rate_at(12 * 60 + 30), Some(1 << 30));
        assert_eq!(schedule.rate_at(20 * 60), None);
        assert_eq!(
            schedule.rate_at(3 * 60),
            None,
            "the evening's entry holds overnight"
        );
        let zero: Schedule = "00:00,0".parse().unwrap();
        assert_eq!(zero.rate_at(600), None, "0 is no limit, as for rate");
    }

    #[test]
    fn bad_timetables_are_refused_with_an_example() {
        for bad in [
            "",
            "8,50M",
            "25:00,1M",
            "08:60,1M",
            "08:00,fast",
            "19:00,1M 08:00,2M",
            "8:5,1M",
        ] {
            let err = bad.parse::<Schedule>().unwrap_err();
            assert!(err.expected.contains("08:00,50M"), "{bad}: {err:?}");
        }
    }
}
