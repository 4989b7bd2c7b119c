//! An orbit: the tiers a stream moves along, least dense first, as an
//! admin writes them: `-p orbit=fast:/ssd/streams,dense:/hdd/streams:zstd`
//! (NAME:DIRECTORY[:FORMAT], FORMAT `plain` by default).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// How a tier stores an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The bytes as written.
    Plain,
    /// zstd's seekable format ([`crate::seekable`]).
    Zstd,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Plain => "plain",
            Format::Zstd => "zstd",
        }
    }
}

/// One tier: a name, a directory, a format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub dir: PathBuf,
    pub format: Format,
}

/// The tiers in order of density, least dense first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orbit {
    tiers: Vec<Tier>,
}

/// Why an orbit was refused, in the admin's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("orbit {text:?}: {why} (NAME:/DIRECTORY[:plain|:zstd],… least dense first)")]
pub struct OrbitError {
    text: String,
    why: String,
}

impl Orbit {
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The tier a stream on tier `at` moves to next, if any.
    pub fn next_after(&self, at: usize) -> Option<usize> {
        (at + 1 < self.tiers.len()).then_some(at + 1)
    }
}

impl From<OrbitError> for dmm_control::ValueError {
    fn from(err: OrbitError) -> dmm_control::ValueError {
        dmm_control::ValueError::new(
            "an orbit",
            &err.text,
            format!(
                "{}; NAME:/DIRECTORY[:plain|:zstd],… least dense first",
                err.why
            ),
        )
    }
}

impl FromStr for Orbit {
    type Err = OrbitError;

    fn from_str(text: &str) -> Result<Orbit, OrbitError> {
        let refuse = |why: String| OrbitError {
            text: text.to_owned(),
            why,
        };
        let mut tiers: Vec<Tier> = Vec::new();
        for part in text.split(',') {
            let tier = tier(part).map_err(&refuse)?;
            if tiers.iter().any(|t| t.name == tier.name) {
                return Err(refuse(format!("tier {} is named twice", tier.name)));
            }
            if tiers.iter().any(|t| t.dir == tier.dir) {
                return Err(refuse(format!(
                    "{} is the directory of two tiers",
                    tier.dir.display()
                )));
            }
            tiers.push(tier);
        }
        if tiers.len() < 2 {
            return Err(refuse(
                "a stream moves between two tiers at least".to_owned(),
            ));
        }
        Ok(Orbit { tiers })
    }
}

/// One `NAME:/DIRECTORY[:FORMAT]`.
fn tier(part: &str) -> Result<Tier, String> {
    let mut fields = part.split(':');
    let name = fields.next().unwrap_or_default();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "{part:?} does not start with a tier name (letters, digits, - and _)"
        ));
    }
    let dir = PathBuf::from(fields.next().unwrap_or_default());
    if !dir.is_absolute() {
        return Err(format!(
            "tier {name}: {:?} is not an absolute directory",
            dir.display().to_string()
        ));
    }
    let format = match fields.next() {
        None | Some("plain") => Format::Plain,
        Some("zstd") => Format::Zstd,
        Some(other) => {
            return Err(format!(
                "tier {name}: format {other:?} is neither plain nor zstd"
            ));
        }
    };
    if fields.next().is_some() {
        return Err(format!("{part:?} has more than NAME:DIRECTORY:FORMAT"));
    }
    Ok(Tier {
        name: name.to_owned(),
        dir,
        format,
    })
}

impl fmt::Display for Orbit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .tiers
            .iter()
            .map(|t| format!("{}:{}:{}", t.name, t.dir.display(), t.format.as_str()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_s_example_reads_as_two_tiers() {
        let orbit: Orbit = "fast:/ssd/streams,dense:/hdd/streams:zstd".parse().unwrap();
        let tiers = orbit.tiers();
        assert_eq!(
            (tiers[0].name.as_str(), tiers[0].format),
            ("fast", Format::Plain)
        );
        assert_eq!(
            (tiers[1].dir.to_str(), tiers[1].format),
            (Some("/hdd/streams"), Format::Zstd)
        );
        assert_eq!(orbit.next_after(0), Some(1));
        assert_eq!(orbit.next_after(1), None);
        assert_eq!(
            orbit.to_string().parse::<Orbit>().unwrap(),
            orbit,
            "it prints as it reads"
        );
    }

    #[test]
    fn a_bad_orbit_is_refused_with_the_reason() {
        for (text, why) in [
            ("fast:/ssd", "two tiers at least"),
            ("fast:ssd,dense:/hdd", "not an absolute directory"),
            ("fast:/ssd,dense:/hdd:lz4", "neither plain nor zstd"),
            ("fast:/ssd,fast:/hdd", "named twice"),
            ("fast:/ssd,dense:/ssd", "directory of two tiers"),
            (":/ssd,dense:/hdd", "tier name"),
            ("fast:/ssd,dense:/hdd:zstd:9", "more than"),
        ] {
            let err = text.parse::<Orbit>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
