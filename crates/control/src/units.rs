//! Sizes and rates as admins type them (`4096`, `64K`, `1.5G`, `2MiB`:
//! powers of 1024) and as dmm prints them, and the one error every parser of
//! a typed value returns.

/// A value that does not parse: what it should have been and what was
/// typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not {what} ({expected})")]
pub struct ValueError {
    /// What the text should have been, with its article ("a size").
    pub what: &'static str,
    pub text: String,
    /// The valid choices or examples.
    pub expected: String,
}

impl ValueError {
    pub fn new(what: &'static str, text: &str, expected: impl Into<String>) -> ValueError {
        ValueError {
            what,
            text: text.to_owned(),
            expected: expected.into(),
        }
    }
}

/// Parses `N[.N][KMGTP][B]` (case-insensitive, powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, ValueError> {
    let bad = || ValueError::new("a size", text, "examples: 4096, 64K, 1.5G, 2MiB");
    let lower = text.trim().to_ascii_lowercase();
    let without_b = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let shift = match without_b.chars().last() {
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        _ => 0,
    };
    let number = if shift > 0 {
        &without_b[..without_b.len() - 1]
    } else {
        without_b
    };
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a binary unit, for humans.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_the_seed_format() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64kb"), Ok(65536));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        for bad in ["", "K", "1.2.3M", "12Q", "-5", "x"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        let err = parse_size("x").unwrap_err().to_string();
        assert!(
            err.contains("is not a size") && err.contains("64K"),
            "{err}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
