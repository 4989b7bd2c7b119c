//! A migration's properties parsed once into a typed specification of its
//! kind: what the engines are opened with and what a live change sets.
//!
//! The property table ([`crate::properties`]) validated the text on the way
//! into the catalog; this is the only place that turns it into values.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use dmm_catalog::{Kind, MigrationId};
use dmm_control::{Priority, ValueError, parse_size};
use dmm_volume::{MigrationConfig, Strategy, Verify};

use crate::properties::{self, PropertyError};
use crate::schedule::Schedule;

/// What a migration moves and how, by kind.
#[derive(Debug, Clone)]
pub enum Spec {
    Volume(VolumeSpec),
    Tree(TreeSpec),
    Stream(StreamSpec),
}

/// A volume migration.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Image file, block device or NBD URI, as typed.
    pub source: String,
    pub target: String,
    /// The NBD export name.
    pub export: String,
    /// Wait for `dmm switchover` before switching (`switchover=manual`).
    pub manual_switchover: bool,
    pub config: MigrationConfig,
}

/// A tree migration.
#[derive(Debug, Clone)]
pub struct TreeSpec {
    /// Everything but the journal's path, which the supervisor chooses.
    pub config: dmm_tree::TreeConfig,
    /// Compare checksums before the migration is ready to commit.
    pub verify: bool,
}

/// A stream store.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub orbit: dmm_stream::orbit::Orbit,
    /// Where the access point is mounted.
    pub access: PathBuf,
    pub access_users: dmm_tree::AccessUsers,
    pub policy: dmm_stream::Policy,
    pub rate: Option<u64>,
    pub priority: Priority,
}

/// The controls a running migration picks up at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub rate: Option<u64>,
    pub priority: Priority,
    pub in_flight: usize,
}

/// Reads properties, defaults filled in, as typed values.
struct Reader<'a> {
    properties: &'a BTreeMap<String, String>,
}

impl Reader<'_> {
    fn text(&self, name: &str) -> &str {
        properties::value(self.properties, name).unwrap_or_default()
    }

    fn typed<T: FromStr>(&self, name: &str) -> Result<T, PropertyError>
    where
        T::Err: Into<ValueError>,
    {
        self.text(name)
            .parse()
            .map_err(|why: T::Err| PropertyError::BadValue {
                name: name.to_owned(),
                why: why.into(),
            })
    }

    fn size(&self, name: &str) -> Result<u64, PropertyError> {
        parse_size(self.text(name)).map_err(|why| PropertyError::BadValue {
            name: name.to_owned(),
            why,
        })
    }

    fn count(&self, name: &str) -> Result<usize, PropertyError> {
        self.text(name)
            .parse()
            .map_err(|_| PropertyError::BadValue {
                name: name.to_owned(),
                why: ValueError::new("a whole number", self.text(name), "e.g. 4"),
            })
    }

    /// When streams move (`after`, `above`).
    fn policy(&self) -> Result<dmm_stream::Policy, PropertyError> {
        let bad = |name: &str| {
            let name = name.to_owned();
            move |why| PropertyError::BadValue { name, why }
        };
        Ok(dmm_stream::Policy {
            after: self
                .properties
                .get("after")
                .map(|text| properties::parse_duration(text))
                .transpose()
                .map_err(bad("after"))?,
            above: self
                .properties
                .get("above")
                .map(|text| parse_size(text))
                .transpose()
                .map_err(bad("above"))?,
        })
    }

    fn live(&self) -> Result<Live, PropertyError> {
        Ok(Live {
            // A timetable, when there is one, decides the rate.
            rate: match self.properties.get("schedule") {
                Some(text) => text
                    .parse::<Schedule>()
                    .map_err(|why| PropertyError::BadValue {
                        name: "schedule".into(),
                        why,
                    })?
                    .rate_now(),
                None => Some(self.size("rate")?).filter(|&rate| rate > 0),
            },
            priority: self.typed("priority")?,
            in_flight: match self.properties.contains_key("copies") {
                true => self.count("copies")?,
                false => 8,
            },
        })
    }
}

impl Spec {
    /// The specification a create request's properties describe: each
    /// property valid and meant for the kind, the required ones present.
    pub fn of_new(properties: &BTreeMap<String, String>) -> Result<Spec, PropertyError> {
        properties::check_new(properties)?;
        Spec::parse(0, properties)
    }

    /// Parses the properties of migration `id`.
    pub fn parse(
        id: MigrationId,
        properties: &BTreeMap<String, String>,
    ) -> Result<Spec, PropertyError> {
        let read = Reader { properties };
        let live = read.live()?;
        let verify: Verify = read.typed("verify")?;
        match properties::kind_of(properties)? {
            Kind::Volume => Ok(Spec::Volume(VolumeSpec {
                source: read.text("source").to_owned(),
                target: read.text("target").to_owned(),
                export: properties
                    .get("export")
                    .cloned()
                    .unwrap_or_else(|| id.to_string()),
                manual_switchover: read.text("switchover") == "manual",
                config: MigrationConfig {
                    strategy: read.typed::<Strategy>("strategy")?,
                    chunk_size: read.size("segsize")?,
                    rate: live.rate,
                    in_flight: live.in_flight,
                    priority: live.priority,
                    verify,
                    ..MigrationConfig::default()
                },
            })),
            Kind::Tree => Ok(Spec::Tree(TreeSpec {
                config: dmm_tree::TreeConfig {
                    migid: id,
                    source: read.text("source").into(),
                    target: read.text("target").into(),
                    access: read.text("access").into(),
                    journal: PathBuf::new(),
                    segsize: read.size("segsize")?,
                    collision: read.typed("collision")?,
                    access_users: read.typed("access-users")?,
                    rate: live.rate,
                    priority: live.priority,
                    dir_workers: read.count("maxnsproc")?,
                    file_workers: read.count("maxdfproc")?,
                },
                verify: verify == Verify::Full,
            })),
            Kind::Stream => Ok(Spec::Stream(StreamSpec {
                orbit: read.typed("orbit")?,
                access: read.text("access").into(),
                access_users: read.typed("access-users")?,
                policy: read.policy()?,
                rate: live.rate,
                priority: live.priority,
            })),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Spec::Volume(_) => Kind::Volume,
            Spec::Tree(_) => Kind::Tree,
            Spec::Stream(_) => Kind::Stream,
        }
    }

    /// The controls a running migration picks up at once.
    pub fn live(&self) -> Live {
        match self {
            Spec::Volume(volume) => Live {
                rate: volume.config.rate,
                priority: volume.config.priority,
                in_flight: volume.config.in_flight,
            },
            Spec::Tree(tree) => Live {
                rate: tree.config.rate,
                priority: tree.config.priority,
                in_flight: 1,
            },
            Spec::Stream(stream) => Live {
                rate: stream.rate,
                priority: stream.priority,
                in_flight: 1,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties::props;

    #[test]
    fn a_volume_spec_follows_the_properties() {
        let spec = Spec::parse(
            7,
            &props(&[
                ("source", "/a"),
                ("target", "/b"),
                ("strategy", "lr"),
                ("segsize", "256K"),
                ("rate", "10M"),
            ]),
        )
        .unwrap();
        let Spec::Volume(volume) = spec else {
            panic!("a volume")
        };
        assert_eq!(volume.config.strategy, Strategy::Lr);
        assert_eq!(volume.config.chunk_size, 256 << 10);
        assert_eq!(volume.config.rate, Some(10 << 20));
        assert_eq!(volume.config.verify, Verify::Full);
        assert_eq!(volume.export, "7");
        assert!(!volume.manual_switchover);
    }

    #[test]
    fn a_stream_spec_follows_the_properties() {
        let spec = Spec::parse(
            5,
            &props(&[
                ("kind", "stream"),
                ("orbit", "fast:/ssd/s,dense:/hdd/s:zstd"),
                ("access", "/m"),
                ("above", "1G"),
            ]),
        )
        .unwrap();
        assert_eq!(spec.kind(), Kind::Stream);
        let Spec::Stream(stream) = spec else {
            panic!("a stream store")
        };
        assert_eq!(stream.orbit.tiers().len(), 2);
        assert_eq!(stream.policy.above, Some(1 << 30));
        assert_eq!(stream.policy.after, None);
        let err = Spec::of_new(&props(&[("kind", "stream"), ("access", "/m")])).unwrap_err();
        assert!(err.to_string().contains("missing property orbit"), "{err}");
        let err = Spec::of_new(&props(&[
            ("kind", "stream"),
            ("orbit", "fast:/a,fast:/b"),
            ("access", "/m"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("named twice"), "{err}");
    }

    #[test]
    fn a_tree_spec_follows_the_properties() {
        let spec = Spec::parse(
            3,
            &props(&[
                ("kind", "tree"),
                ("source", "/s"),
                ("target", "/t"),
                ("access", "/m"),
                ("rate", "0"),
                ("verify", "none"),
                ("maxdfproc", "9"),
            ]),
        )
        .unwrap();
        assert_eq!(spec.kind(), Kind::Tree);
        assert_eq!(spec.live().rate, None);
        let Spec::Tree(tree) = spec else {
            panic!("a tree")
        };
        assert_eq!(tree.config.file_workers, 9);
        assert_eq!(tree.config.dir_workers, 2);
        assert!(!tree.verify);
    }
}
