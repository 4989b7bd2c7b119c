//! Migration properties: names, defaults, valid values, and when each may
//! change.
//!
//! Volume and tree migrations share one property table: each property says
//! which kinds it applies to, and one that does not apply is refused by
//! name rather than silently ignored.
//!
//! Properties are stored as the user typed them (so `dmm get` shows
//! `64K`, not `65536`) and validated on the way in: an unknown name or a bad
//! value is refused with the valid choices before anything is written.

use std::collections::BTreeMap;

use dmm_catalog::State;
use dmm_control::parse_size;
use dmm_volume::{MigrationConfig, Priority, Strategy, Verify};

/// When a property may be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// At any time; a running migration picks it up at once.
    Live,
    /// Only before the migration first starts (created or halted with its
    /// state removed).
    BeforeStart,
}

/// Which kinds of migration a property applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    Both,
    Volume,
    Tree,
}

impl Applies {
    fn to(self, kind: &str) -> bool {
        match self {
            Applies::Both => true,
            Applies::Volume => kind == "volume",
            Applies::Tree => kind == "tree",
        }
    }
}

/// One property.
pub struct Property {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub change: Change,
    pub applies: Applies,
    pub help: &'static str,
    check: fn(&str) -> Result<(), String>,
}

fn non_empty(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

fn one_of(value: &str, choices: &[&str]) -> Result<(), String> {
    if choices.contains(&value) {
        Ok(())
    } else {
        Err(format!("must be one of {}", choices.join(", ")))
    }
}

fn kind(value: &str) -> Result<(), String> {
    one_of(value, &["volume", "tree"])
}

fn collision(value: &str) -> Result<(), String> {
    value.parse::<dmm_tree::Collision>().map(|_| ())
}

fn strategy(value: &str) -> Result<(), String> {
    value
        .parse::<Strategy>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn switchover(value: &str) -> Result<(), String> {
    one_of(value, &["auto", "manual"])
}

fn priority(value: &str) -> Result<(), String> {
    value
        .parse::<Priority>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn verify(value: &str) -> Result<(), String> {
    one_of(value, &["none", "full"])
}

fn segsize(value: &str) -> Result<(), String> {
    let size = parse_size(value).map_err(|e| e.to_string())?;
    if size.is_power_of_two() && (4096..=1 << 30).contains(&size) {
        Ok(())
    } else {
        Err("must be a power of two from 4K to 1G".into())
    }
}

fn rate(value: &str) -> Result<(), String> {
    parse_size(value).map(|_| ()).map_err(|e| e.to_string())
}

fn count(value: &str) -> Result<(), String> {
    match value.parse::<usize>() {
        Ok(1..=1024) => Ok(()),
        _ => Err("must be a whole number from 1 to 1024".into()),
    }
}

/// Every property, in the order `dmm get` shows them.
pub const PROPERTIES: &[Property] = &[
    Property {
        name: "kind",
        applies: Applies::Both,
        default: Some("volume"),
        change: Change::BeforeStart,
        help: "what is migrated: volume or tree (a directory tree)",
        check: kind,
    },
    Property {
        name: "source",
        applies: Applies::Both,
        default: None,
        change: Change::BeforeStart,
        help: "volume: image file, block device or NBD URI; tree: a directory (read-only)",
        check: non_empty,
    },
    Property {
        name: "target",
        applies: Applies::Both,
        default: None,
        change: Change::BeforeStart,
        help: "volume: image file, block device or NBD URI, at least as large as the \
               source; tree: a local directory",
        check: non_empty,
    },
    Property {
        name: "strategy",
        applies: Applies::Volume,
        default: Some("auto"),
        change: Change::BeforeStart,
        help: "precopy, mirror, aio, slr, lr, redirect or auto",
        check: strategy,
    },
    Property {
        name: "export",
        applies: Applies::Volume,
        default: None,
        change: Change::BeforeStart,
        help: "NBD export name (default: the migid)",
        check: non_empty,
    },
    Property {
        name: "switchover",
        applies: Applies::Volume,
        default: Some("auto"),
        change: Change::Live,
        help: "auto: switch as soon as the strategy allows; manual: wait for `dmm switchover`",
        check: switchover,
    },
    Property {
        name: "segsize",
        applies: Applies::Both,
        default: Some("1M"),
        change: Change::BeforeStart,
        help: "chunk (volume) or file segment (tree) size, N[.N][KMGTP][B]",
        check: segsize,
    },
    Property {
        name: "rate",
        applies: Applies::Both,
        default: Some("0"),
        change: Change::Live,
        help: "copy bandwidth limit in bytes per second (0: none), N[.N][KMGTP][B]",
        check: rate,
    },
    Property {
        name: "priority",
        applies: Applies::Both,
        default: Some("normal"),
        change: Change::Live,
        help: "low, normal or high",
        check: priority,
    },
    Property {
        name: "copies",
        applies: Applies::Volume,
        default: Some("8"),
        change: Change::Live,
        help: "chunks copied at once",
        check: count,
    },
    Property {
        name: "verify",
        applies: Applies::Both,
        default: Some("full"),
        change: Change::BeforeStart,
        help: "none or full (BLAKE3 comparison of every chunk, or of every file not \
               changed through the access point, before commit)",
        check: verify,
    },
    Property {
        name: "logfile",
        applies: Applies::Both,
        default: None,
        change: Change::Live,
        help: "file that receives the migration's log lines",
        check: non_empty,
    },
    Property {
        name: "access",
        applies: Applies::Tree,
        default: None,
        change: Change::BeforeStart,
        help: "empty directory where the FUSE access point is mounted",
        check: non_empty,
    },
    Property {
        name: "collision",
        applies: Applies::Tree,
        default: Some("error"),
        change: Change::BeforeStart,
        help: "a name in both source and target: error, overwrite or rename",
        check: collision,
    },
    Property {
        name: "maxnsproc",
        applies: Applies::Tree,
        default: Some("2"),
        change: Change::BeforeStart,
        help: "directory workers",
        check: count,
    },
    Property {
        name: "maxdfproc",
        applies: Applies::Tree,
        default: Some("4"),
        change: Change::BeforeStart,
        help: "file workers",
        check: count,
    },
];

/// A property by name.
pub fn lookup(name: &str) -> Result<&'static Property, String> {
    PROPERTIES.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PROPERTIES.iter().map(|p| p.name).collect();
        format!("unknown property {name:?} (valid: {})", names.join(", "))
    })
}

/// Checks one `name=value`.
pub fn check(name: &str, value: &str) -> Result<(), String> {
    let property = lookup(name)?;
    (property.check)(value).map_err(|why| format!("bad value {value:?} for {name}: {why}"))
}

/// Checks a set of properties for a new migration: each one valid and
/// meant for its kind, `source` and `target` (and a tree's `access`)
/// present.
pub fn check_new(properties: &BTreeMap<String, String>) -> Result<(), String> {
    let kind = value(properties, "kind").unwrap_or("volume");
    for (name, value) in properties {
        check(name, value)?;
        check_applies(name, kind)?;
    }
    let required: &[&str] = match kind {
        "tree" => &["source", "target", "access"],
        _ => &["source", "target"],
    };
    for required in required {
        if !properties.contains_key(*required) {
            return Err(format!("missing property {required} (-p {required}=…)"));
        }
    }
    Ok(())
}

/// Refuses a property that does not apply to a kind of migration.
pub fn check_applies(name: &str, kind: &str) -> Result<(), String> {
    let property = lookup(name)?;
    if property.applies.to(kind) {
        return Ok(());
    }
    let meant = match property.applies {
        Applies::Volume => "volume",
        _ => "tree",
    };
    Err(format!(
        "{name} applies to {meant} migrations only, not to a {kind} migration"
    ))
}

/// Checks that `name` may change in `state`.
pub fn check_change(name: &str, state: State) -> Result<(), String> {
    let property = lookup(name)?;
    let before_start = matches!(state, State::Created | State::Halted);
    if property.change == Change::BeforeStart && !before_start {
        return Err(format!(
            "{name} can only change before the migration starts (it is {state}; halt it with --remove first)"
        ));
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
pub fn effective(properties: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let kind = value(properties, "kind").unwrap_or("volume");
    PROPERTIES
        .iter()
        .filter(|p| p.applies.to(kind))
        .filter_map(|p| value(properties, p.name).map(|v| (p.name.to_owned(), v.to_owned())))
        .collect()
}

/// The engine configuration the properties describe.
pub fn config(properties: &BTreeMap<String, String>) -> MigrationConfig {
    let get = |name| value(properties, name).unwrap_or_default();
    MigrationConfig {
        strategy: get("strategy").parse().unwrap_or(Strategy::Auto),
        chunk_size: parse_size(get("segsize")).unwrap_or(1 << 20),
        rate: rate_of(properties),
        in_flight: get("copies").parse().unwrap_or(8),
        priority: get("priority").parse().unwrap_or_default(),
        verify: if get("verify") == "none" {
            Verify::None
        } else {
            Verify::Full
        },
        ..MigrationConfig::default()
    }
}

/// The tree engine configuration the properties describe; `journal` is
/// where the migration keeps its state.
pub fn tree_config(
    migid: i64,
    properties: &BTreeMap<String, String>,
    journal: std::path::PathBuf,
) -> dmm_tree::TreeConfig {
    let get = |name| value(properties, name).unwrap_or_default();
    let config = config(properties);
    dmm_tree::TreeConfig {
        migid,
        source: get("source").into(),
        target: get("target").into(),
        access: get("access").into(),
        journal,
        segsize: config.chunk_size,
        collision: get("collision")
            .parse()
            .unwrap_or(dmm_tree::Collision::Error),
        rate: config.rate,
        priority: config.priority,
        dir_workers: get("maxnsproc").parse().unwrap_or(2),
        file_workers: get("maxdfproc").parse().unwrap_or(4),
    }
}

/// The bandwidth limit, `None` for unlimited.
pub fn rate_of(properties: &BTreeMap<String, String>) -> Option<u64> {
    value(properties, "rate")
        .and_then(|r| parse_size(r).ok())
        .filter(|&r| r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_input_names_the_problem_and_the_choices() {
        let err = check("speed", "1").unwrap_err();
        assert!(
            err.contains("unknown property") && err.contains("rate"),
            "{err}"
        );
        let err = check("strategy", "fast").unwrap_err();
        assert!(err.contains("precopy, mirror"), "{err}");
        let err = check("segsize", "3K").unwrap_err();
        assert!(err.contains("power of two"), "{err}");
        let err = check_new(&props(&[("source", "/a")])).unwrap_err();
        assert!(err.contains("target"), "{err}");
        let err = check_change("segsize", State::Running).unwrap_err();
        assert!(err.contains("before the migration starts"), "{err}");
        assert!(check_change("rate", State::Running).is_ok());
    }

    #[test]
    fn the_config_follows_the_properties() {
        let config = config(&props(&[
            ("strategy", "lr"),
            ("segsize", "256K"),
            ("rate", "10M"),
        ]));
        assert_eq!(config.strategy, Strategy::Lr);
        assert_eq!(config.chunk_size, 256 << 10);
        assert_eq!(config.rate, Some(10 << 20));
        assert_eq!(config.verify, Verify::Full);
        assert_eq!(rate_of(&props(&[("rate", "0")])), None);
    }
}
