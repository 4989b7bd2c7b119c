//! The daemon's own settings, as opposed to a migration's properties: kept
//! in the catalog's `config` table so that they survive a restart, shown
//! and changed live by `dmm config`, the API and the dashboard.

use std::collections::BTreeMap;

use dmm_catalog::Catalog;
use dmm_control::ValueError;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// One setting.
pub struct Setting {
    pub name: &'static str,
    /// The value in force when none is set (setting it again removes the
    /// row).
    pub default: &'static str,
    pub help: &'static str,
    check: fn(&str) -> Result<(), ValueError>,
}

/// Every setting, in the order `dmm config` shows them.
pub const SETTINGS: &[Setting] = &[Setting {
    name: "maxrunning",
    default: "unlimited",
    help: "how many migrations copy or verify at once; a start beyond it waits \
           in the queue (dmm queue), paused ones keep their slot",
    check: |text| max_running(text).map(drop),
}];

/// A setting as shown: its value, whether it is the default, and what it
/// does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    pub value: String,
    pub default: bool,
    pub help: String,
}

/// Reads `maxrunning`: `unlimited` or a whole number from 1.
pub fn max_running(text: &str) -> Result<Option<u32>, ValueError> {
    match text {
        "unlimited" => Ok(None),
        _ => match text.parse::<u32>() {
            Ok(limit @ 1..) => Ok(Some(limit)),
            _ => Err(ValueError::new(
                "a number of migrations",
                text,
                "a whole number from 1, or unlimited",
            )),
        },
    }
}

fn lookup(name: &str) -> Result<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name).ok_or_else(|| {
        let valid: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        Error::new(
            ErrorKind::Invalid,
            format!("unknown setting {name:?} (valid: {})", valid.join(", ")),
        )
    })
}

/// A setting's value in force.
pub fn value(catalog: &Catalog, name: &str) -> Result<String> {
    let setting = lookup(name)?;
    Ok(catalog
        .config(name)?
        .unwrap_or_else(|| setting.default.to_owned()))
}

/// Every setting with its value in force.
pub fn all(catalog: &Catalog) -> Result<BTreeMap<String, Shown>> {
    SETTINGS
        .iter()
        .map(|setting| {
            let set = catalog.config(setting.name)?;
            let shown = Shown {
                default: set.is_none(),
                help: setting.help.to_owned(),
                value: set.unwrap_or_else(|| setting.default.to_owned()),
            };
            Ok((setting.name.to_owned(), shown))
        })
        .collect()
}

/// Checks every change, then records them (a value equal to the default
/// removes the row).
pub fn change(catalog: &Catalog, changes: &BTreeMap<String, String>) -> Result<()> {
    for (name, text) in changes {
        (lookup(name)?.check)(text).map_err(|why| {
            Error::new(ErrorKind::Invalid, format!("bad value for {name}: {why}"))
        })?;
    }
    for (name, text) in changes {
        let default = lookup(name)?.default;
        let stored = (text != default).then_some(text.as_str());
        catalog.set_config(name, stored)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_stored_and_reset_to_their_default() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        assert_eq!(value(&catalog, "maxrunning").unwrap(), "unlimited");
        let set = BTreeMap::from([("maxrunning".to_owned(), "2".to_owned())]);
        change(&catalog, &set).unwrap();
        let shown = &all(&catalog).unwrap()["maxrunning"];
        assert_eq!((shown.value.as_str(), shown.default), ("2", false));
        for (bad, said) in [("0", "from 1"), ("two", "unlimited"), ("-1", "whole")] {
            let changes = BTreeMap::from([("maxrunning".to_owned(), bad.to_owned())]);
            let err = change(&catalog, &changes).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Invalid);
            assert!(err.to_string().contains(said), "{err}");
        }
        let err = change(
            &catalog,
            &BTreeMap::from([("maxrun".to_owned(), "2".to_owned())]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("valid: maxrunning"), "{err}");
        let reset = BTreeMap::from([("maxrunning".to_owned(), "unlimited".to_owned())]);
        change(&catalog, &reset).unwrap();
        assert_eq!(catalog.config("maxrunning").unwrap(), None);
        assert_eq!(max_running("3"), Ok(Some(3)));
        assert_eq!(max_running("unlimited"), Ok(None));
    }
}
