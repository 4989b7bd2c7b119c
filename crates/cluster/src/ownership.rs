//! Who owns each volume, changed only by compare-and-swap on the owner
//! key's revision (the fencing token, see [`crate::records`]).
//!
//! The changes a move between nodes makes, each one transaction:
//!
//! | step | compares | writes |
//! |---|---|---|
//! | [`Cluster::claim`] | owner key absent | owner = this node |
//! | [`Cluster::hand_over`] | owner revision = token | owner = peer, move = handed |
//! | [`Cluster::take_back`] | owner and move revisions as read, move handed from this node | owner = this node, move deleted |
//! | [`Cluster::committed`] | owner and move revisions as read, move handed from this node | move = committed |
//! | [`Cluster::release`] | owner revision as read, owned by this node or committed away from it | owner deleted if this node's, move deleted |

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::etcd::Etcd;
use crate::membership::{Cluster, decode};
use crate::records::{self, MovePhase, MoveRecord, OwnerRecord};

/// A fencing token: the revision at which a volume's owner last changed.
pub type Token = i64;

/// A volume's owner, its token, and the move under way if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    pub token: Token,
    pub size: u64,
    #[serde(default)]
    pub moving: Option<MoveRecord>,
}

/// A record as read, with its key's `mod_revision`.
type Versioned<T> = (T, i64);

/// The owner and move keys of one volume as read.
struct Read {
    owner: Option<Versioned<OwnerRecord>>,
    moving: Option<Versioned<MoveRecord>>,
}

impl Cluster {
    /// The owner of `volume` as etcd says now (this node's view of it
    /// is updated too).
    pub async fn owner(&self, volume: &str) -> Result<Option<Owner>> {
        let owner = owner_of(self.read(volume).await?);
        self.remember(volume, owner.clone());
        Ok(owner)
    }

    /// The owner of `volume` as this node last read it (at most a sixth of
    /// the lease's TTL ago, or at its own last change of owner).
    pub fn owner_seen(&self, volume: &str) -> Option<Owner> {
        self.view.read().get(volume).cloned()
    }

    /// The token of `volume` as this node last read it (checked on every
    /// forwarded request: nothing is copied).
    pub fn token_seen(&self, volume: &str) -> Option<Token> {
        self.view.read().get(volume).map(|owner| owner.token)
    }

    /// The token under which this node serves `volume` now: its fence is
    /// open, and as last read it owns the volume or is the node the volume
    /// moves from (whose export every request of the move goes through
    /// until the commit, and forwards to the new owner after it).
    pub fn serves(&self, volume: &str) -> Result<Token> {
        if !self.fence.is_open() {
            return Err(Error::new(ErrorKind::Fenced, "serve", volume)
                .with_detail("its lease may have expired; it serves again once renewed"));
        }
        // Read in place: this runs on every request a node serves.
        let view = self.view.read();
        match view.get(volume) {
            Some(owner) if owner.node == self.node => Ok(owner.token),
            Some(owner) if owner.moving.as_ref().is_some_and(|m| m.from == self.node) => {
                Ok(owner.token)
            }
            Some(owner) => Err(Error::new(ErrorKind::Conflict, "serve", volume)
                .with_detail(format!("{} owns it", owner.node))),
            None => {
                Err(Error::new(ErrorKind::Conflict, "serve", volume).with_detail("no node owns it"))
            }
        }
    }

    /// Makes this node the owner of `volume` if no node is; returns its
    /// token. Owned by this node already: the current token.
    pub async fn claim(&self, volume: &str, size: u64) -> Result<Token> {
        let key = records::owner_key(volume);
        let mine = encode(&OwnerRecord {
            node: self.node.clone(),
            size,
        });
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, mine, None)]);
        if let Some(token) = self.swap("claim", volume, txn).await? {
            return Ok(token);
        }
        match self.owner(volume).await? {
            Some(owner) if owner.node == self.node => {
                self.remember(volume, Some(owner.clone()));
                Ok(owner.token)
            }
            Some(owner) => Err(Error::new(ErrorKind::Conflict, "claim", volume)
                .with_detail(format!("{} owns it", owner.node))),
            None => Err(Error::new(ErrorKind::Conflict, "claim", volume)
                .with_detail("its owner changed during the claim; try again")),
        }
    }

    /// Makes `to` the owner of `volume`, which this node owns under
    /// `token`, and records the move as handed; returns the new token.
    pub async fn hand_over(&self, volume: &str, token: Token, to: &str) -> Result<Token> {
        let (key, size) = (records::owner_key(volume), self.size_seen(volume));
        let theirs = encode(&OwnerRecord {
            node: to.to_owned(),
            size,
        });
        let moving = MoveRecord {
            phase: MovePhase::Handed,
            from: self.node.clone(),
            to: to.to_owned(),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, token)])
            .and_then([
                TxnOp::put(key, theirs, None),
                TxnOp::put(records::move_key(volume), encode(&moving), None),
            ]);
        match self.swap("hand over", volume, txn).await? {
            Some(new) => Ok(new),
            None => Err(self.stale("hand over", volume, token).await),
        }
    }

    /// Takes back `volume`, handed over by this node and not committed
    /// (a rollback); returns this node's new token.
    pub async fn take_back(&self, volume: &str) -> Result<Token> {
        let read = self.read(volume).await?;
        let (owner, moving) = self.handed_from_here("take back", volume, &read)?;
        let mine = encode(&OwnerRecord {
            node: self.node.clone(),
            size: owner.0.size,
        });
        let (key, move_key) = (records::owner_key(volume), records::move_key(volume));
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, owner.1),
                Compare::mod_revision(move_key.clone(), CompareOp::Equal, moving.1),
            ])
            .and_then([TxnOp::put(key, mine, None), TxnOp::delete(move_key, None)]);
        match self.swap("take back", volume, txn).await? {
            Some(token) => Ok(token),
            None => Err(self.stale("take back", volume, owner.1).await),
        }
    }

    /// Records that the move of `volume`, handed over by this node, is
    /// committed: the token stays the peer's.
    pub async fn committed(&self, volume: &str) -> Result<()> {
        let read = self.read(volume).await?;
        if let Some((moving, _)) = &read.moving
            && moving.phase == MovePhase::Committed
            && moving.from == self.node
        {
            return Ok(());
        }
        let (owner, moving) = self.handed_from_here("commit", volume, &read)?;
        let committed = MoveRecord {
            phase: MovePhase::Committed,
            ..moving.0.clone()
        };
        let (key, move_key) = (records::owner_key(volume), records::move_key(volume));
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, owner.1),
                Compare::mod_revision(move_key.clone(), CompareOp::Equal, moving.1),
            ])
            .and_then([TxnOp::put(move_key, encode(&committed), None)]);
        match self.swap("commit", volume, txn).await? {
            Some(_) => Ok(()),
            None => Err(self.stale("commit", volume, owner.1).await),
        }
    }

    /// Gives `volume` up: deletes its owner key if this node owns it, and
    /// a committed move away from this node. Nothing to do for a volume
    /// this node has nothing to do with.
    pub async fn release(&self, volume: &str) -> Result<()> {
        let read = self.read(volume).await?;
        let (key, move_key) = (records::owner_key(volume), records::move_key(volume));
        let mut compares = Vec::new();
        let mut deletes = Vec::new();
        if let Some((owner, token)) = &read.owner
            && owner.node == self.node
        {
            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *token));
            deletes.push(TxnOp::delete(key, None));
        }
        if let Some((moving, revision)) = &read.moving
            && (moving.from == self.node || deletes.len() == 1)
        {
            compares.push(Compare::mod_revision(
                move_key.clone(),
                CompareOp::Equal,
                *revision,
            ));
            deletes.push(TxnOp::delete(move_key, None));
        }
        if deletes.is_empty() {
            return Ok(());
        }
        let txn = Txn::new().when(compares).and_then(deletes);
        match self.swap("release", volume, txn).await? {
            Some(_) => Ok(()),
            None => Err(Error::new(ErrorKind::Conflict, "release", volume)
                .with_detail("its owner changed meanwhile; try again")),
        }
    }

    /// Runs a transaction; `Some(revision)` if its comparisons held. The
    /// view is read again either way.
    async fn swap(&self, operation: &'static str, volume: &str, txn: Txn) -> Result<Option<Token>> {
        let answer = self
            .etcd
            .call(operation, volume, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = answer.header().map_or(0, |header| header.revision());
        // The view follows this node's own changes at once.
        let _ = self.owner(volume).await;
        Ok(answer.succeeded().then_some(revision))
    }

    /// The owner and move of a volume handed over by this node.
    fn handed_from_here<'r>(
        &self,
        operation: &'static str,
        volume: &str,
        read: &'r Read,
    ) -> Result<(&'r Versioned<OwnerRecord>, &'r Versioned<MoveRecord>)> {
        match (&read.owner, &read.moving) {
            (Some(owner), Some(moving))
                if moving.0.phase == MovePhase::Handed
                    && moving.0.from == self.node
                    && owner.0.node == moving.0.to =>
            {
                Ok((owner, moving))
            }
            (owner, _) => {
                let who = owner
                    .as_ref()
                    .map_or("no node".to_owned(), |(record, _)| record.node.clone());
                Err(
                    Error::new(ErrorKind::Conflict, operation, volume).with_detail(format!(
                        "it is not handed over by {} ({who} owns it)",
                        self.node
                    )),
                )
            }
        }
    }

    /// The refusal of a change made under a token that is not current.
    async fn stale(&self, operation: &'static str, volume: &str, token: Token) -> Error {
        let now = match self.owner(volume).await {
            Ok(Some(owner)) => format!("{} owns it under token {}", owner.node, owner.token),
            Ok(None) => "no node owns it".to_owned(),
            Err(err) => format!("its owner cannot be read: {err}"),
        };
        Error::new(ErrorKind::Conflict, operation, volume)
            .with_detail(format!("token {token} is not current: {now}"))
    }

    async fn read(&self, volume: &str) -> Result<Read> {
        let (key, move_key) = (records::owner_key(volume), records::move_key(volume));
        let txn = Txn::new().and_then([TxnOp::get(key, None), TxnOp::get(move_key, None)]);
        let answer = self
            .etcd
            .call("read the owner of", volume, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let mut found = answer
            .op_responses()
            .into_iter()
            .map(|response| match response {
                TxnOpResponse::Get(got) => got.kvs().first().cloned(),
                _ => None,
            });
        let (owner, moving) = (found.next().flatten(), found.next().flatten());
        Ok(Read {
            owner: owner
                .map(|kv| {
                    Ok::<_, Error>((decode(kv.value(), "owner", kv.key())?, kv.mod_revision()))
                })
                .transpose()?,
            moving: moving
                .map(|kv| {
                    Ok::<_, Error>((decode(kv.value(), "move", kv.key())?, kv.mod_revision()))
                })
                .transpose()?,
        })
    }

    fn remember(&self, volume: &str, owner: Option<Owner>) {
        let mut view = self.view.write();
        match owner {
            Some(owner) => view.insert(volume.to_owned(), owner),
            None => view.remove(volume),
        };
    }

    fn size_seen(&self, volume: &str) -> u64 {
        self.owner_seen(volume).map_or(0, |owner| owner.size)
    }
}

fn owner_of(read: Read) -> Option<Owner> {
    read.owner.map(|(record, token)| Owner {
        node: record.node,
        token,
        size: record.size,
        moving: read.moving.map(|(moving, _)| moving),
    })
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("a record serializes")
}

/// Every owner and move, read at one revision.
pub(crate) async fn read_owners(etcd: &Etcd) -> Result<BTreeMap<String, Owner>> {
    let prefix = || Some(GetOptions::new().with_prefix());
    let txn = Txn::new().and_then([
        TxnOp::get(records::OWNERS, prefix()),
        TxnOp::get(records::MOVES, prefix()),
    ]);
    let answer = etcd
        .call("read", "the owners", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
    let mut lists = answer
        .op_responses()
        .into_iter()
        .map(|response| match response {
            TxnOpResponse::Get(got) => got.kvs().to_vec(),
            _ => Vec::new(),
        });
    let (owners, moves) = (
        lists.next().unwrap_or_default(),
        lists.next().unwrap_or_default(),
    );
    let mut moving = BTreeMap::new();
    for kv in &moves {
        let record: MoveRecord = decode(kv.value(), "move", kv.key())?;
        moving.insert(volume_of(kv, records::MOVES), record);
    }
    let mut found = BTreeMap::new();
    for kv in &owners {
        let record: OwnerRecord = decode(kv.value(), "owner", kv.key())?;
        let volume = volume_of(kv, records::OWNERS);
        let owner = Owner {
            node: record.node,
            token: kv.mod_revision(),
            size: record.size,
            moving: moving.remove(&volume),
        };
        found.insert(volume, owner);
    }
    Ok(found)
}

fn volume_of(kv: &KeyValue, prefix: &str) -> String {
    let key = String::from_utf8_lossy(kv.key());
    key.strip_prefix(prefix).unwrap_or(&key).to_owned()
}
