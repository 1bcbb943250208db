//! Calendar dates from day counts (proleptic Gregorian, UTC), for file names and manifests.

/// `(year, month 1-12, day 1-31)` of `days` since 1970-01-01 (negative before it), after
/// Howard Hinnant's civil-from-days algorithm.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2000-02-29: 10957 days to 2000-01-01, + 59.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        // 2026-11-27 (`date -d 2026-11-27 +%s` / 86400 = 20784).
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }
}
