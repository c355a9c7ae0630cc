//! Wall-clock times as the agent records them (role history, run records,
//! the names of the folders it keeps files in).

use std::time::SystemTime;

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A UTC timestamp for folder names, now: `20261122T031500Z`.
pub fn timestamp() -> String {
    timestamp_at(unix(SystemTime::now()))
}

/// [`timestamp`] of `secs` seconds since the Unix epoch (the epoch itself
/// for a time chrono cannot represent, hundreds of thousands of years off).
pub fn timestamp_at(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    /// The date arithmetic `timestamp_at` replaced (Howard Hinnant's
    /// `civil_from_days`), kept as the reference its output must match.
    fn civil_from_days(z: i64) -> (i64, u32, u32) {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        (if m <= 2 { y + 1 } else { y }, m, d)
    }

    fn reference(secs: i64) -> String {
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let rem = secs.rem_euclid(86_400);
        format!(
            "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    #[test]
    fn folder_timestamps_are_those_of_the_old_date_arithmetic() {
        assert_eq!(super::timestamp_at(0), "19700101T000000Z");
        assert_eq!(
            super::timestamp_at(20_779 * 86_400 + 3 * 3600 + 15 * 60),
            "20261122T031500Z"
        );
        assert_eq!(super::timestamp_at(11_016 * 86_400 + 86_399), "20000229T235959Z");
        // Every day from 1970 to 2170, at a time of day that moves through
        // the hours, minutes and seconds.
        for day in 0..73_000_i64 {
            let secs = day * 86_400 + (day * 7_919) % 86_400;
            assert_eq!(super::timestamp_at(secs), reference(secs), "day {day}");
        }
    }
}
