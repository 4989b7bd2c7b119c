//! Migration properties: names, defaults, valid values, which kinds each
//! applies to, and when each may change.
//!
//! Volume and tree migrations share one property table: each property says
//! which kind it applies to, and one that does not apply is refused by
//! name rather than silently ignored.
//!
//! Properties are stored as the user typed them (so `dmm get` shows
//! `64K`, not `65536`) and validated on the way in: an unknown name or a bad
//! value is refused with the valid choices before anything is written. The
//! engines never see them as text: the `spec` module parses them once into a
//! typed specification per kind.

use std::collections::BTreeMap;
use std::str::FromStr;

use dmm_catalog::{Kind, State, UnknownName};
use dmm_control::{Priority, ValueError, parse_size};
use dmm_volume::{Strategy, Verify};

/// When a property may be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// At any time; a running migration picks it up at once.
    Live,
    /// Only before the migration first starts (created or halted with its
    /// state removed).
    BeforeStart,
}

/// One property.
pub struct Property {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub change: Change,
    /// The kinds it applies to (empty: every kind).
    pub applies: &'static [Kind],
    pub help: &'static str,
    check: fn(&str) -> Result<(), ValueError>,
}

/// Why a property was refused: one line naming it and the valid choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertyError {
    #[error("unknown property {name:?} (valid: {valid})")]
    Unknown { name: String, valid: String },
    #[error("bad value {:?} for {name}: not {} ({})", why.text, why.what, why.expected)]
    BadValue { name: String, why: ValueError },
    #[error("missing property {name} (-p {name}=…)")]
    Missing { name: &'static str },
    #[error(
        "{name} applies to {} migrations only, not to a {kind} migration",
        kinds(meant)
    )]
    NotForKind {
        name: &'static str,
        meant: &'static [Kind],
        kind: Kind,
    },
    #[error(
        "{name} can only change before the migration starts (it is {state}; halt it with --remove first)"
    )]
    NotNow { name: &'static str, state: State },
}

impl PropertyError {
    /// Whether the property is fine but the migration's state is not.
    pub fn is_conflict(&self) -> bool {
        matches!(self, PropertyError::NotNow { .. })
    }
}

fn non_empty(value: &str) -> Result<(), ValueError> {
    if value.trim().is_empty() {
        Err(ValueError::new("a path or URI", value, "must not be empty"))
    } else {
        Ok(())
    }
}

/// A file the daemon writes: an absolute path (a relative one would land
/// wherever the daemon happens to run).
fn absolute_file(value: &str) -> Result<(), ValueError> {
    if std::path::Path::new(value).is_absolute() && !value.ends_with('/') {
        Ok(())
    } else {
        Err(ValueError::new(
            "an absolute file path",
            value,
            "such as /var/log/dmm/vm1.log",
        ))
    }
}

/// Checks a value by parsing it as the type the engines use.
fn parsed<T: FromStr>(value: &str) -> Result<(), ValueError>
where
    T::Err: Into<ValueError>,
{
    value.parse::<T>().map(|_| ()).map_err(Into::into)
}

fn kind(value: &str) -> Result<(), ValueError> {
    parse_kind(value).map(|_| ())
}

fn parse_kind(value: &str) -> Result<Kind, ValueError> {
    value
        .parse()
        .map_err(|e: UnknownName| ValueError::new("a kind", value, format!("choose {}", e.valid)))
}

fn switchover(value: &str) -> Result<(), ValueError> {
    match value {
        "auto" | "manual" => Ok(()),
        _ => Err(ValueError::new(
            "a switchover mode",
            value,
            "choose auto or manual",
        )),
    }
}

fn segsize(value: &str) -> Result<(), ValueError> {
    let size = parse_size(value)?;
    if size.is_power_of_two() && (4096..=1 << 30).contains(&size) {
        Ok(())
    } else {
        Err(ValueError::new(
            "a power of two from 4K to 1G",
            value,
            "e.g. 64K, 1M",
        ))
    }
}

fn rate(value: &str) -> Result<(), ValueError> {
    parse_size(value).map(|_| ())
}

fn schedule(value: &str) -> Result<(), ValueError> {
    value.parse::<crate::schedule::Schedule>().map(drop)
}

fn count(value: &str) -> Result<(), ValueError> {
    match value.parse::<usize>() {
        Ok(1..=1024) => Ok(()),
        _ => Err(ValueError::new(
            "a whole number from 1 to 1024",
            value,
            "e.g. 4",
        )),
    }
}

const VOLUME_AND_TREE: &[Kind] = &[Kind::Volume, Kind::Tree];
const TREE_AND_STREAM: &[Kind] = &[Kind::Tree, Kind::Stream];

/// Every property, in the order `dmm get` shows them.
pub const PROPERTIES: &[Property] = &[
    Property {
        name: "kind",
        applies: &[],
        default: Some("volume"),
        change: Change::BeforeStart,
        help: "what is migrated: volume, tree (a directory tree) or stream (append-only \
               files moved along an orbit of tiers while they are written)",
        check: kind,
    },
    Property {
        name: "source",
        applies: VOLUME_AND_TREE,
        default: None,
        change: Change::BeforeStart,
        help: "volume: image file, block device or NBD URI; tree: a directory (read-only)",
        check: non_empty,
    },
    Property {
        name: "target",
        applies: VOLUME_AND_TREE,
        default: None,
        change: Change::BeforeStart,
        help: "volume: image file, block device or NBD URI, at least as large as the \
               source; tree: a local directory",
        check: non_empty,
    },
    Property {
        name: "strategy",
        applies: &[Kind::Volume],
        default: Some("auto"),
        change: Change::BeforeStart,
        help: "precopy, mirror, aio, slr, lr, redirect or auto",
        check: parsed::<Strategy>,
    },
    Property {
        name: "export",
        applies: &[Kind::Volume],
        default: None,
        change: Change::BeforeStart,
        help: "NBD export name (default: the migid)",
        check: non_empty,
    },
    Property {
        name: "switchover",
        applies: &[Kind::Volume],
        default: Some("auto"),
        change: Change::Live,
        help: "auto: switch as soon as the strategy allows; manual: wait for `dmm switchover`",
        check: switchover,
    },
    Property {
        name: "segsize",
        applies: VOLUME_AND_TREE,
        default: Some("1M"),
        change: Change::BeforeStart,
        help: "chunk (volume) or file segment (tree) size, N[.N][KMGTP][B]",
        check: segsize,
    },
    Property {
        name: "rate",
        applies: &[],
        default: Some("0"),
        change: Change::Live,
        help: "copy bandwidth limit in bytes per second (0: none), N[.N][KMGTP][B]",
        check: rate,
    },
    Property {
        name: "schedule",
        applies: &[],
        default: None,
        change: Change::Live,
        help: "a daily bandwidth timetable in the daemon's local time, used instead of rate: \
               HH:MM,RATE ... (RATE 0 or off: no limit), e.g. 08:00,50M 19:00,off",
        check: schedule,
    },
    Property {
        name: "priority",
        applies: &[],
        default: Some("normal"),
        change: Change::Live,
        help: "low, normal or high",
        check: parsed::<Priority>,
    },
    Property {
        name: "copies",
        applies: &[Kind::Volume],
        default: Some("8"),
        change: Change::Live,
        help: "chunks copied at once",
        check: count,
    },
    Property {
        name: "verify",
        applies: VOLUME_AND_TREE,
        default: Some("full"),
        change: Change::BeforeStart,
        help: "none or full (BLAKE3 comparison of every chunk, or of every file not \
               changed through the access point, before commit)",
        check: parsed::<Verify>,
    },
    Property {
        name: "logfile",
        applies: &[],
        default: None,
        change: Change::Live,
        help: "file that receives the migration's log lines (an absolute path; \
               a regular file the daemon's user owns, with no other name, never \
               followed through a symbolic link)",
        check: absolute_file,
    },
    Property {
        name: "access",
        applies: TREE_AND_STREAM,
        default: None,
        change: Change::BeforeStart,
        help: "empty directory where the FUSE access point is mounted (a stream store's \
               shows one file per stream)",
        check: non_empty,
    },
    Property {
        name: "access-users",
        applies: TREE_AND_STREAM,
        default: Some("owner"),
        change: Change::BeforeStart,
        help: "who may use the access point: owner (the daemon's user) or all (every \
               user, granted what the target's owners and modes grant; needs a root daemon)",
        check: parsed::<dmm_tree::AccessUsers>,
    },
    Property {
        name: "collision",
        applies: &[Kind::Tree],
        default: Some("error"),
        change: Change::BeforeStart,
        help: "a name in both source and target: error, overwrite or rename",
        check: parsed::<dmm_tree::Collision>,
    },
    Property {
        name: "maxnsproc",
        applies: &[Kind::Tree],
        default: Some("2"),
        change: Change::BeforeStart,
        help: "directory workers",
        check: count,
    },
    Property {
        name: "maxdfproc",
        applies: &[Kind::Tree],
        default: Some("4"),
        change: Change::BeforeStart,
        help: "file workers",
        check: count,
    },
    Property {
        name: "orbit",
        applies: &[Kind::Stream],
        default: None,
        change: Change::BeforeStart,
        help: "the tiers streams move along, least dense first: \
               NAME:/DIRECTORY[:plain|:zstd],… e.g. fast:/ssd/streams,dense:/hdd/streams:zstd",
        check: parsed::<dmm_stream::orbit::Orbit>,
    },
    Property {
        name: "after",
        applies: &[Kind::Stream],
        default: None,
        change: Change::Live,
        help: "move a stream to the next tier once its last append is older than this \
               (e.g. 1h, 30m); with neither after nor above, streams move at once",
        check: duration,
    },
    Property {
        name: "above",
        applies: &[Kind::Stream],
        default: None,
        change: Change::Live,
        help: "move a stream to the next tier once it is larger than this, N[.N][KMGTP][B]",
        check: rate,
    },
];

/// A property by name.
pub fn lookup(name: &str) -> Result<&'static Property, PropertyError> {
    PROPERTIES
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PropertyError::Unknown {
            name: name.to_owned(),
            valid: PROPERTIES
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Checks one `name=value`.
pub fn check(name: &str, value: &str) -> Result<(), PropertyError> {
    let property = lookup(name)?;
    (property.check)(value).map_err(|why| PropertyError::BadValue {
        name: name.to_owned(),
        why,
    })
}

/// The kind the properties describe.
pub fn kind_of(properties: &BTreeMap<String, String>) -> Result<Kind, PropertyError> {
    let text = value(properties, "kind").unwrap_or_default();
    parse_kind(text).map_err(|why| PropertyError::BadValue {
        name: "kind".into(),
        why,
    })
}

/// Kinds as a sentence names them: "volume", "tree or stream".
fn kinds(kinds: &[Kind]) -> String {
    let names: Vec<_> = kinds.iter().map(|k| k.as_str()).collect();
    names.join(" or ")
}

/// A duration such as `90s`, `30m`, `1h`.
fn duration(value: &str) -> Result<(), ValueError> {
    parse_duration(value).map(drop)
}

/// The duration `value` names.
pub fn parse_duration(value: &str) -> Result<std::time::Duration, ValueError> {
    humantime::parse_duration(value)
        .map_err(|_| ValueError::new("a duration", value, "e.g. 90s, 30m, 1h"))
}

/// Checks a set of properties for a new migration: each one valid and
/// meant for its kind, `source` and `target` (and a tree's `access`)
/// present.
pub fn check_new(properties: &BTreeMap<String, String>) -> Result<(), PropertyError> {
    for (name, value) in properties {
        check(name, value)?;
    }
    let kind = kind_of(properties)?;
    for name in properties.keys() {
        check_applies(name, kind)?;
    }
    let required: &[&'static str] = match kind {
        Kind::Tree => &["source", "target", "access"],
        Kind::Volume => &["source", "target"],
        Kind::Stream => &["orbit", "access"],
    };
    match required
        .iter()
        .find(|name| !properties.contains_key(**name))
    {
        Some(name) => Err(PropertyError::Missing { name }),
        None => Ok(()),
    }
}

/// Refuses a property that does not apply to a kind of migration.
pub fn check_applies(name: &str, kind: Kind) -> Result<(), PropertyError> {
    let property = lookup(name)?;
    if property.applies.is_empty() || property.applies.contains(&kind) {
        return Ok(());
    }
    Err(PropertyError::NotForKind {
        name: property.name,
        meant: property.applies,
        kind,
    })
}

/// Checks that `name` may change in `state`.
pub fn check_change(name: &str, state: State) -> Result<(), PropertyError> {
    let property = lookup(name)?;
    if property.change == Change::BeforeStart && !state.before_start() {
        return Err(PropertyError::NotNow {
            name: property.name,
            state,
        });
    }
    Ok(())
}

/// A property's value, or its default.
pub fn value<'a>(properties: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    properties
        .get(name)
        .map(String::as_str)
        .or_else(|| lookup(name).ok().and_then(|p| p.default))
}

/// Every property of the migration's kind with its effective value
/// (defaults filled in).
pub fn effective(properties: &BTreeMap<String, String>, kind: Kind) -> BTreeMap<String, String> {
    PROPERTIES
        .iter()
        .filter(|p| p.applies.is_empty() || p.applies.contains(&kind))
        .filter_map(|p| value(properties, p.name).map(|v| (p.name.to_owned(), v.to_owned())))
        .collect()
}

/// Properties from `name`, `value` pairs (for tests).
#[cfg(test)]
pub fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_names_the_problem_and_the_choices() {
        let err = check("speed", "1").unwrap_err().to_string();
        assert!(
            err.contains("unknown property") && err.contains("rate"),
            "{err}"
        );
        let err = check("strategy", "fast").unwrap_err().to_string();
        assert!(err.contains("precopy, mirror"), "{err}");
        let err = check("segsize", "3K").unwrap_err().to_string();
        assert!(err.contains("power of two"), "{err}");
        let err = check("rate", "fast").unwrap_err().to_string();
        assert!(
            err.contains("not a size") || err.contains("must be a size"),
            "{err}"
        );
        let err = check_new(&props(&[("source", "/a")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("target"), "{err}");
        let err = check_new(&props(&[("kind", "disk")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("volume, tree, stream"), "{err}");
        let err = check_change("segsize", State::Running).unwrap_err();
        assert!(err.is_conflict());
        assert!(
            err.to_string().contains("before the migration starts"),
            "{err}"
        );
        assert!(check_change("rate", State::Running).is_ok());
        let err = check_applies("access", Kind::Volume)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tree or stream migrations only"), "{err}");
    }

    #[test]
    fn effective_properties_are_those_of_the_kind_with_defaults() {
        let tree = effective(&props(&[("kind", "tree")]), Kind::Tree);
        assert_eq!(tree["collision"], "error");
        assert!(!tree.contains_key("strategy"));
        let volume = effective(&props(&[]), Kind::Volume);
        assert_eq!(volume["strategy"], "auto");
        assert!(!volume.contains_key("access"));
    }
}
