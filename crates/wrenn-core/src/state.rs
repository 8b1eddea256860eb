//! Sandbox states and the transitions allowed between them.
//!
//! The intermediate states (`creating`, `pausing`, `resuming`) are written to the database
//! before the agent is asked to act, so another request (or a restarted control plane) sees
//! that an operation is under way and does not start a second one, and placement counts a
//! sandbox whose VM is still being made.

use std::fmt;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxState {
    /// Placed on a host whose agent is making the VM; not shown to clients yet.
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    Killed,
}

/// What someone asks to happen to a sandbox, or what the agent reports as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    CreateDone,
    CreateFailed,
    Pause,
    PauseDone,
    PauseFailed,
    Resume,
    ResumeDone,
    ResumeFailed,
    Kill,
}

/// The two states the E2B API shows; the SDKs reject anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublicState {
    Running,
    Paused,
}

/// A transition that the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action:?} a sandbox that is {from}")]
pub struct TransitionError {
    pub from: SandboxState,
    pub action: Action,
}

impl SandboxState {
    /// The state after `action`, or why it is not allowed.
    pub fn apply(self, action: Action) -> Result<SandboxState, TransitionError> {
        use Action as A;
        use SandboxState as S;
        let next = match (self, action) {
            (S::Creating, A::CreateDone) => S::Running,
            (S::Creating, A::CreateFailed) => S::Killed,
            (S::Running, A::Pause) => S::Pausing,
            (S::Pausing, A::PauseDone) => S::Paused,
            (S::Pausing, A::PauseFailed) => S::Running,
            (S::Paused, A::Resume) => S::Resuming,
            (S::Resuming, A::ResumeDone) => S::Running,
            (S::Resuming, A::ResumeFailed) => S::Paused,
            (S::Running | S::Paused, A::Kill) => S::Killed,
            (from, action) => return Err(TransitionError { from, action }),
        };
        Ok(next)
    }

    /// The state the API reports. Transitions show the state they started from, so a client
    /// polling `get_info` never sees a state its SDK cannot parse. A sandbox being created
    /// has none: until its create answered, nobody has been told it exists.
    pub fn public(self) -> Option<PublicState> {
        match self {
            SandboxState::Running | SandboxState::Pausing => Some(PublicState::Running),
            SandboxState::Paused | SandboxState::Resuming => Some(PublicState::Paused),
            SandboxState::Creating | SandboxState::Killed => None,
        }
    }

    /// Whether the sandbox holds a VM on a host (and so counts against its capacity).
    pub fn occupies_host(self) -> bool {
        matches!(
            self,
            SandboxState::Creating
                | SandboxState::Running
                | SandboxState::Pausing
                | SandboxState::Resuming
        )
    }

    /// The stable name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Killed => "killed",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        Some(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "pausing" => SandboxState::Pausing,
            "paused" => SandboxState::Paused,
            "resuming" => SandboxState::Resuming,
            "killed" => SandboxState::Killed,
            _ => return None,
        })
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PublicState {
    pub fn as_str(self) -> &'static str {
        match self {
            PublicState::Running => "running",
            PublicState::Paused => "paused",
        }
    }

    pub fn parse(s: &str) -> Option<PublicState> {
        match s {
            "running" => Some(PublicState::Running),
            "paused" => Some(PublicState::Paused),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Action as A, SandboxState as S, *};

    const ALL_STATES: [S; 6] = [
        S::Creating,
        S::Running,
        S::Pausing,
        S::Paused,
        S::Resuming,
        S::Killed,
    ];
    const ALL_ACTIONS: [A; 9] = [
        A::CreateDone,
        A::CreateFailed,
        A::Pause,
        A::PauseDone,
        A::PauseFailed,
        A::Resume,
        A::ResumeDone,
        A::ResumeFailed,
        A::Kill,
    ];

    #[test]
    fn transition_table() {
        // Every (state, action) pair, written out, so a change to the machine shows up here.
        let allowed = [
            (S::Creating, A::CreateDone, S::Running),
            (S::Creating, A::CreateFailed, S::Killed),
            (S::Running, A::Pause, S::Pausing),
            (S::Pausing, A::PauseDone, S::Paused),
            (S::Pausing, A::PauseFailed, S::Running),
            (S::Paused, A::Resume, S::Resuming),
            (S::Resuming, A::ResumeDone, S::Running),
            (S::Resuming, A::ResumeFailed, S::Paused),
            (S::Running, A::Kill, S::Killed),
            (S::Paused, A::Kill, S::Killed),
        ];
        for from in ALL_STATES {
            for action in ALL_ACTIONS {
                let want = allowed
                    .iter()
                    .find(|(f, a, _)| *f == from && *a == action)
                    .map(|(_, _, to)| *to)
                    .ok_or(TransitionError { from, action });
                assert_eq!(from.apply(action), want, "{from} + {action:?}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_public_states() {
        for s in ALL_STATES {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
        assert_eq!(S::parse("RUNNING"), None);
        assert_eq!(S::Pausing.public(), Some(PublicState::Running));
        assert_eq!(S::Resuming.public(), Some(PublicState::Paused));
        assert_eq!(S::Killed.public(), None);
        assert_eq!(S::Creating.public(), None);
        assert_eq!(PublicState::parse("paused"), Some(PublicState::Paused));
        assert_eq!(PublicState::parse("killed"), None);
        assert!(S::Resuming.occupies_host() && !S::Paused.occupies_host());
        assert!(S::Creating.occupies_host() && !S::Killed.occupies_host());
    }
}
