//! A migration's lifecycle as data: its states, the verbs an admin applies
//! to it, and one table that says, for each verb, the states it is valid
//! in, the state it leads to and what a restarted daemon does with it when
//! it was left half done.
//!
//! The daemon's supervisor checks every verb against [`RULES`] and records
//! the typed [`Verb`] in the catalog's intents; recovery reads the same
//! table. The README's state table is generated from it
//! ([`markdown_table`]) and a test keeps the two equal.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Created,
    /// Started, waiting for one of the daemon's `maxrunning` slots.
    Queued,
    Running,
    Paused,
    Stopped,
    SwitchedOver,
    Verifying,
    Committed,
    Halted,
    RolledBack,
    Failed,
}

impl State {
    pub const ALL: [State; 11] = [
        State::Created,
        State::Queued,
        State::Running,
        State::Paused,
        State::Stopped,
        State::Verifying,
        State::SwitchedOver,
        State::Committed,
        State::Halted,
        State::RolledBack,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Queued => "queued",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::SwitchedOver => "switched-over",
            State::Verifying => "verifying",
            State::Committed => "committed",
            State::Halted => "halted",
            State::RolledBack => "rolled-back",
            State::Failed => "failed",
        }
    }

    /// Whether the migration waits for the admin (nothing moves by
    /// itself until a verb): `dmm stat INTERVAL` stops repeating.
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            State::Queued | State::Running | State::Paused | State::Verifying
        )
    }

    /// Whether the migration holds one of the daemon's `maxrunning` slots:
    /// its copy or verification is under way (a paused copy keeps its
    /// slot, so that resuming it never waits).
    pub fn holds_slot(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Verifying)
    }

    /// Whether the migration's run has ended with a known outcome (for now:
    /// a halted or failed one may start again). Its summary records when.
    pub fn has_ended(self) -> bool {
        matches!(
            self,
            State::Committed | State::RolledBack | State::Halted | State::Failed
        )
    }

    /// Whether properties that apply only before the start may change.
    pub fn before_start(self) -> bool {
        matches!(self, State::Created | State::Halted)
    }

    /// What a restarted daemon does with a migration in this state.
    pub fn on_restart(self) -> Reopen {
        match self {
            State::Running | State::Verifying | State::SwitchedOver => Reopen::Drive,
            State::Paused => Reopen::DrivePaused,
            State::Failed | State::RolledBack => Reopen::Serve,
            State::Created | State::Queued | State::Stopped | State::Committed | State::Halted => {
                Reopen::Closed
            }
        }
    }
}

/// How a restarted daemon brings back a migration's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// Left closed: nothing runs or serves in this state.
    Closed,
    /// Opened (its export serving clients) but not driven.
    Serve,
    /// Opened and driven: the copy, verification or waiting goes on.
    Drive,
    /// Opened and driven with its copy paused.
    DrivePaused,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of a closed set (a state, a verb, a kind).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {text:?} (valid: {valid})")]
pub struct UnknownName {
    pub what: &'static str,
    pub text: String,
    pub valid: String,
}

fn find<T: Copy>(
    what: &'static str,
    text: &str,
    all: &[T],
    name: impl Fn(T) -> String,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|&item| name(item) == text)
        .ok_or_else(|| UnknownName {
            what,
            text: text.to_owned(),
            valid: all
                .iter()
                .map(|&item| name(item))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl FromStr for State {
    type Err = UnknownName;

    fn from_str(text: &str) -> Result<State, UnknownName> {
        find("state", text, &State::ALL, |s| s.as_str().to_owned())
    }
}

/// What a migration moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A disk image, block device or NBD export, served over NBD.
    #[default]
    Volume,
    /// A directory tree behind a FUSE access point.
    Tree,
    /// Append-only streams behind a FUSE access point, moved along an
    /// orbit of tiers while they are written.
    Stream,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Volume, Kind::Tree, Kind::Stream];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Tree => "tree",
            Kind::Stream => "stream",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownName;

    fn from_str(text: &str) -> Result<Kind, UnknownName> {
        find("kind", text, &Kind::ALL, |k| k.as_str().to_owned())
    }
}

/// What an admin asks of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verb")]
pub enum Verb {
    Start,
    Pause,
    Resume,
    Stop,
    /// With `remove`, the copy state is deleted (the next start begins
    /// from zero).
    Halt {
        remove: bool,
    },
    Switchover,
    Commit,
    Rollback,
    Set,
    /// With `force`, also while the migration runs.
    Delete {
        force: bool,
    },
}

impl Verb {
    /// Every verb in every form, in the order the README lists them.
    pub const ALL: [Verb; 12] = [
        Verb::Start,
        Verb::Resume,
        Verb::Pause,
        Verb::Stop,
        Verb::Halt { remove: false },
        Verb::Halt { remove: true },
        Verb::Switchover,
        Verb::Commit,
        Verb::Rollback,
        Verb::Set,
        Verb::Delete { force: false },
        Verb::Delete { force: true },
    ];

    /// The verb's name, without its options (as in the API's paths).
    pub fn name(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Stop => "stop",
            Verb::Halt { .. } => "halt",
            Verb::Switchover => "switchover",
            Verb::Commit => "commit",
            Verb::Rollback => "rollback",
            Verb::Set => "set",
            Verb::Delete { .. } => "delete",
        }
    }

    /// The verb's table row.
    pub fn rule(self) -> &'static Rule {
        RULES
            .iter()
            .find(|rule| rule.verb == self)
            .expect("every verb has a rule")
    }
}

/// The verb as the CLI spells it (`halt --remove`, `delete -f`); the
/// catalog stores this form.
impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verb::Halt { remove: true } => f.write_str("halt --remove"),
            Verb::Halt { remove: false } => f.write_str("halt --keep"),
            Verb::Delete { force: true } => f.write_str("delete -f"),
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Verb {
    type Err = UnknownName;

    /// Reads what [`fmt::Display`] writes; a bare `halt` (as catalogs
    /// written before the verb was typed hold) keeps the copy state.
    fn from_str(text: &str) -> Result<Verb, UnknownName> {
        match text {
            "halt" => Ok(Verb::Halt { remove: false }),
            _ => find("verb", text, &Verb::ALL, |v| v.to_string()),
        }
    }
}

/// Where a verb takes the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leads {
    /// To this state (once the act is done).
    To(State),
    /// To `running` when the daemon admits it (a `maxrunning` slot is
    /// free, or its engine is already open: it serves clients or holds a
    /// slot), else to `queued`, where the daemon starts it, in queue
    /// order, once a slot frees.
    Admitted,
    /// Nowhere: the state stays (no intent is recorded).
    Stays,
    /// The migration is deleted.
    Gone,
}

/// What a restarted daemon does with a transition it finds half done
/// (its intent recorded, its outcome not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Records the state the verb leads to: the act changed nothing on disk
    /// that needs finishing, and the reopening that follows recovery puts
    /// the engine where the state says (open, paused, closed).
    Record,
    /// Does the act again (each act may be repeated), then records its
    /// outcome; if the act fails, the migration goes back to the state it
    /// was in before the verb, with the error recorded.
    Redo,
}

/// Where a verb whose act fails leaves the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// As it was: the intent is dropped and the error reported.
    Unchanged,
    /// Failed, with the error recorded (a verb that was to set it
    /// running could not).
    Failed,
}

/// One row of the lifecycle table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub verb: Verb,
    pub valid: &'static [State],
    pub leads: Leads,
    pub recovery: Recovery,
    pub failure: Failure,
    /// Said when the verb is refused, after the valid states.
    pub note: &'static str,
}

use State::*;

/// Every state but the two that end a migration.
const NOT_ENDED: &[State] = &[
    Created,
    Queued,
    Running,
    Paused,
    Stopped,
    Verifying,
    SwitchedOver,
    Halted,
    Failed,
];

/// The lifecycle table.
pub const RULES: &[Rule] = &[
    Rule {
        verb: Verb::Start,
        valid: &[Created, Queued, Paused, Stopped, Halted, Failed],
        leads: Leads::Admitted,
        recovery: Recovery::Record,
        failure: Failure::Failed,
        note: "",
    },
    Rule {
        verb: Verb::Resume,
        valid: &[Paused],
        leads: Leads::To(Running),
        recovery: Recovery::Record,
        failure: Failure::Failed,
        note: "",
    },
    Rule {
        verb: Verb::Pause,
        valid: &[Running],
        leads: Leads::To(Paused),
        recovery: Recovery::Record,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Stop,
        valid: &[Queued, Running, Paused, Verifying, SwitchedOver, Failed],
        leads: Leads::To(Stopped),
        recovery: Recovery::Record,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Halt { remove: false },
        valid: NOT_ENDED,
        leads: Leads::To(Halted),
        recovery: Recovery::Record,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Halt { remove: true },
        valid: NOT_ENDED,
        leads: Leads::To(Halted),
        recovery: Recovery::Redo,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Switchover,
        valid: &[Running, Paused],
        leads: Leads::Stays,
        recovery: Recovery::Record,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Commit,
        valid: &[SwitchedOver],
        leads: Leads::To(Committed),
        recovery: Recovery::Redo,
        failure: Failure::Unchanged,
        note: ": once the destination holds everything and verification passed",
    },
    Rule {
        verb: Verb::Rollback,
        valid: &[Running, Paused, Stopped, Verifying, SwitchedOver, Failed],
        leads: Leads::To(Running),
        recovery: Recovery::Redo,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Set,
        valid: NOT_ENDED,
        leads: Leads::Stays,
        recovery: Recovery::Record,
        failure: Failure::Unchanged,
        note: "",
    },
    Rule {
        verb: Verb::Delete { force: false },
        valid: &[
            Created,
            Queued,
            Stopped,
            SwitchedOver,
            Committed,
            Halted,
            RolledBack,
            Failed,
        ],
        leads: Leads::Gone,
        recovery: Recovery::Redo,
        failure: Failure::Unchanged,
        note: "; stop it first, or delete -f to force",
    },
    Rule {
        verb: Verb::Delete { force: true },
        valid: &State::ALL,
        leads: Leads::Gone,
        recovery: Recovery::Redo,
        failure: Failure::Unchanged,
        note: "",
    },
];

/// A verb refused in a state: the one line the admin sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("it is {state} ({} is valid when {valid}{note})", verb.name())]
pub struct Refused {
    pub verb: Verb,
    pub state: State,
    pub valid: String,
    /// Why, when the states alone do not say it.
    pub note: &'static str,
}

impl Rule {
    /// Whether the verb may be applied in `state`.
    pub fn check(&self, state: State) -> Result<(), Refused> {
        if self.valid.contains(&state) {
            return Ok(());
        }
        let valid: Vec<&str> = self.valid.iter().map(|s| s.as_str()).collect();
        Err(Refused {
            verb: self.verb,
            state,
            valid: valid.join(", "),
            note: self.note,
        })
    }
}

/// The verbs valid in `state`, as the README's table lists them: a verb
/// whose forms are all valid by its name, otherwise the valid forms.
pub fn valid_verbs(state: State) -> Vec<String> {
    let mut shown: Vec<String> = Vec::new();
    for verb in Verb::ALL {
        let forms: Vec<Verb> = Verb::ALL
            .into_iter()
            .filter(|v| v.name() == verb.name())
            .collect();
        let valid: Vec<Verb> = forms
            .iter()
            .copied()
            .filter(|v| v.rule().valid.contains(&state))
            .collect();
        let text = if valid.is_empty() {
            continue;
        } else if valid.len() == forms.len() {
            verb.name().to_owned()
        } else {
            valid
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !shown.contains(&text) {
            shown.push(text);
        }
    }
    shown
}

/// The README's state table: each state and the verbs valid in it.
pub fn markdown_table() -> String {
    let mut table = String::from("| state | valid verbs |\n|---|---|\n");
    for state in State::ALL {
        table += &format!("| {state} | {} |\n", valid_verbs(state).join(", "));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_has_exactly_one_rule() {
        for verb in Verb::ALL {
            let rows = RULES.iter().filter(|r| r.verb == verb).count();
            assert_eq!(rows, 1, "{verb}");
        }
        assert_eq!(RULES.len(), Verb::ALL.len());
    }

    #[test]
    fn every_state_and_verb_pair_is_decided_by_the_table() {
        for state in State::ALL {
            for verb in Verb::ALL {
                let rule = verb.rule();
                match rule.check(state) {
                    Ok(()) => assert!(rule.valid.contains(&state)),
                    Err(refused) => {
                        let line = refused.to_string();
                        assert!(
                            line.contains(state.as_str()) && line.contains(verb.name()),
                            "{line}"
                        );
                        assert!(!rule.valid.contains(&state));
                    }
                }
            }
        }
    }

    #[test]
    fn the_ends_of_a_migration_admit_only_delete() {
        for state in [Committed, RolledBack] {
            assert_eq!(valid_verbs(state), ["delete"], "{state}");
        }
    }

    #[test]
    fn a_running_migration_is_deleted_only_by_force() {
        assert!(Verb::Delete { force: false }.rule().check(Running).is_err());
        assert!(Verb::Delete { force: true }.rule().check(Running).is_ok());
        assert_eq!(valid_verbs(Running).last().unwrap(), "delete -f");
    }

    #[test]
    fn only_a_failed_start_leaves_a_migration_failed() {
        let failing: Vec<Verb> = RULES
            .iter()
            .filter(|r| r.failure == Failure::Failed)
            .map(|r| r.verb)
            .collect();
        assert_eq!(failing, [Verb::Start, Verb::Resume]);
    }

    #[test]
    fn transitions_that_change_files_are_redone_after_a_crash() {
        let redone: Vec<String> = RULES
            .iter()
            .filter(|r| r.recovery == Recovery::Redo)
            .map(|r| r.verb.to_string())
            .collect();
        assert_eq!(
            redone,
            ["halt --remove", "commit", "rollback", "delete", "delete -f"]
        );
    }

    #[test]
    fn verbs_states_and_kinds_read_back_what_they_write() {
        for verb in Verb::ALL {
            assert_eq!(verb.to_string().parse::<Verb>(), Ok(verb));
        }
        assert_eq!("halt".parse::<Verb>(), Ok(Verb::Halt { remove: false }));
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>(), Ok(state));
        }
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
        }
        let err = "disk".parse::<Kind>().unwrap_err().to_string();
        assert!(err.contains("volume, tree"), "{err}");
    }

    #[test]
    fn the_readme_state_table_is_the_lifecycle_table() {
        let readme = include_str!("../../../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's state table differs from the lifecycle table; it should read:\n{table}"
        );
    }
}
