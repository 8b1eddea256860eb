//! A sandbox's lifecycle settings and auto-resume: what happens at its timeout (`autoPause`:
//! paused, else killed; `autoPauseMemory`: with its memory, else filesystem-only) and whether
//! traffic wakes it while it is paused (`autoResume`), as the SDKs send them on create and read
//! them back from `GET /sandboxes/{id}`; and the edge proxy's side of auto-resume.
//!
//! The SDKs send three create keys (`autoPause`, `autoPauseMemory`, `autoResume.enabled`) and
//! check their combinations before they send them; the same rules are checked here, for
//! clients that do not. A pause keeps the sandbox's memory and files (`pauseMode: full`) unless
//! asked for a filesystem-only one (`autoPauseMemory: false` on create, `memory: false` on
//! pause: `pauseMode: filesystem`), which keeps its disk, synced, and resumes by booting it
//! cold (processes and memory are gone). `connect` with `memory: false` (`on_resume:
//! reboot`) boots a fully paused sandbox's disk cold the same way.
//!
//! Auto-resume: a request through the edge proxy for a paused sandbox with auto-resume resumes
//! it as `POST /v2/sandboxes/{id}/connect` would (the default timeout, under the sandbox's
//! lock, so concurrent requests make one resume) and is then forwarded. A pause or resume
//! already under way is waited for (bounded), not failed. The resume runs detached from the
//! request, like every lifecycle operation: a client that goes away does not cut it short.
//! Without auto-resume a paused sandbox's traffic is answered as before, 502 "was not found",
//! which the SDKs read as "not running" (`is_running()` is false).

use std::sync::Arc;
use std::time::Duration;

use wrenn_api::{NewSandbox, PauseSandbox};
use wrenn_core::{SandboxId, SandboxState};

use crate::error::ApiError;
use crate::service::ControlPlane;
use crate::store::{HostRecord, SandboxRecord, StoreError};

/// How long a proxied request waits for a pause or resume of its sandbox that is already under
/// way before its own resume: as long as the agent is given for either (its slow calls).
const WAIT_FOR_OPERATION: Duration = Duration::from_secs(120);

/// How often a request waiting for another control plane's pause or resume reads the record.
const POLL: Duration = Duration::from_millis(100);

/// What a create asks to happen at the timeout and while the sandbox is paused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lifecycle {
    pub(crate) auto_pause: bool,
    pub(crate) auto_resume: bool,
    /// A pause at the timeout keeps the memory.
    pub(crate) auto_pause_memory: bool,
}

impl Lifecycle {
    /// The lifecycle a create asks for, checked as the SDKs check it.
    pub(crate) fn of(body: &NewSandbox) -> Result<Lifecycle, ApiError> {
        let auto_pause = body.auto_pause.unwrap_or(false);
        let auto_resume = body.auto_resume.is_some_and(|a| a.enabled);
        let auto_pause_memory = body.auto_pause_memory.unwrap_or(true);
        if !auto_pause_memory && !auto_pause {
            return Err(ApiError::BadRequest(
                "autoPauseMemory: false requires autoPause: true (it is how a timeout pauses)"
                    .to_owned(),
            ));
        }
        if !auto_pause_memory && auto_resume {
            return Err(ApiError::BadRequest(
                "autoPauseMemory: false cannot be combined with autoResume.enabled (a \
                 filesystem-only pause resumes by a cold boot, which traffic does not wait for)"
                    .to_owned(),
            ));
        }
        if auto_resume && !auto_pause {
            return Err(ApiError::BadRequest(
                "autoResume.enabled requires autoPause: true (auto-resume wakes a sandbox \
                 that its timeout paused)"
                    .to_owned(),
            ));
        }
        Ok(Lifecycle {
            auto_pause,
            auto_resume,
            auto_pause_memory,
        })
    }
}

/// Whether a pause request keeps the memory (the default) or only the disk.
pub(crate) fn pause_keeps_memory(body: &PauseSandbox) -> bool {
    body.memory.unwrap_or(true)
}

/// `lifecycle` of `GET /sandboxes/{id}`, from the record.
pub(crate) fn reported(rec: &SandboxRecord) -> wrenn_api::Lifecycle {
    wrenn_api::Lifecycle {
        auto_resume: rec.auto_resume,
        on_timeout: if rec.auto_pause { "pause" } else { "kill" }.to_owned(),
    }
}

/// `pauseMode` of `GET /sandboxes/{id}`: set once a pause finished (paused, or being
/// resumed): `full` or `filesystem`.
pub(crate) fn pause_mode(rec: &SandboxRecord) -> Option<String> {
    let mode = if rec.paused_memory {
        "full"
    } else {
        "filesystem"
    };
    matches!(rec.state, SandboxState::Paused | SandboxState::Resuming).then(|| mode.to_owned())
}

/// Why a proxied request could not get its paused sandbox resumed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WakeError {
    #[error("it is still being paused or resumed")]
    Busy,
    #[error("{}", .0.message)]
    Refused(wrenn_api::Error),
}

impl ControlPlane {
    /// The record of the sandbox a proxied request names, if traffic may go to it: a running
    /// one, or one with auto-resume that is paused (or being paused or resumed). Anything else
    /// is not found for sandbox traffic.
    pub(crate) async fn proxied(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let Ok(sid) = SandboxId::parse(id) else {
            return Ok(None);
        };
        Ok(self
            .store
            .get_sandbox(sid.as_str())
            .await?
            .filter(|rec| match rec.state {
                SandboxState::Running => true,
                SandboxState::Paused | SandboxState::Pausing | SandboxState::Resuming => {
                    rec.auto_resume
                }
                SandboxState::Creating | SandboxState::Killed => false,
            }))
    }

    /// The host a proxied request for `rec` goes to; `None` if it has none registered.
    pub(crate) async fn traffic_host(
        &self,
        rec: &SandboxRecord,
    ) -> Result<Option<HostRecord>, StoreError> {
        match &rec.host_id {
            Some(host) => self.store.get_host(host).await,
            None => Ok(None),
        }
    }

    /// Resumes sandbox `rec` (not running, with auto-resume) for the traffic that names it, or
    /// finds it resumed by someone else; `None` when it is gone. Detached from the caller.
    pub(crate) async fn wake(
        self: &Arc<Self>,
        rec: &SandboxRecord,
    ) -> Result<Option<SandboxRecord>, WakeError> {
        let cp = self.clone();
        let id = rec.id.clone();
        tokio::spawn(async move { cp.wake_detached(id).await })
            .await
            .unwrap_or_else(|e| {
                Err(ApiError::Internal(format!("the operation's task failed: {e}")).into())
            })
    }

    #[tracing::instrument(name = "auto_resume", skip_all, fields(sandbox_id = %id))]
    async fn wake_detached(&self, id: SandboxId) -> Result<Option<SandboxRecord>, WakeError> {
        let give_up = tokio::time::Instant::now() + WAIT_FOR_OPERATION;
        let busy = || {
            tracing::warn!(sandbox_id = %id, "a pause or resume of the sandbox did not end in time for its traffic");
            WakeError::Busy
        };
        loop {
            // An operation of this process (a pause, a resume, another request's wake) holds
            // the lock until its record is settled: waiting for it is waiting for it to end.
            let guard = tokio::time::timeout_at(give_up, self.lock(&id))
                .await
                .map_err(|_| busy())?;
            let Some(rec) = self.store.get_sandbox(id.as_str()).await? else {
                return Ok(None);
            };
            match rec.state {
                SandboxState::Running => return Ok(Some(rec)),
                SandboxState::Paused if rec.auto_resume => {
                    self.resume_locked(rec, None, false).await?;
                    tracing::info!(sandbox_id = %id, "sandbox resumed by its traffic");
                    let rec = self.store.get_sandbox(id.as_str()).await?;
                    return Ok(rec.filter(|r| r.state == SandboxState::Running));
                }
                // Another control plane's operation: its record settles when it is done.
                SandboxState::Pausing | SandboxState::Resuming => {}
                _ => return Ok(None),
            }
            drop(guard);
            if tokio::time::Instant::now() + POLL >= give_up {
                return Err(busy());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl From<ApiError> for WakeError {
    fn from(e: ApiError) -> Self {
        // Logged here (in the operation's span) at the level of what it is, as an API answer
        // with it would be; the proxy's 502 carries its public message.
        WakeError::Refused(e.into_body())
    }
}

impl From<StoreError> for WakeError {
    fn from(e: StoreError) -> Self {
        ApiError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_api::AutoResume;

    fn create(pause: Option<bool>, memory: Option<bool>, resume: Option<bool>) -> NewSandbox {
        NewSandbox {
            template_id: "base".into(),
            auto_pause: pause,
            auto_pause_memory: memory,
            auto_resume: resume.map(|enabled| AutoResume { enabled }),
            ..Default::default()
        }
    }

    #[test]
    fn create_lifecycles_as_the_sdks_send_them() {
        let ok = |pause, resume| Lifecycle {
            auto_pause: pause,
            auto_resume: resume,
            auto_pause_memory: true,
        };
        let filesystem = Lifecycle {
            auto_pause_memory: false,
            ..ok(true, false)
        };
        // omitted; kill; pause; full; pause with auto-resume; auto_resume False alone;
        // filesystem-only.
        for (body, want) in [
            (create(None, None, None), ok(false, false)),
            (create(Some(false), None, None), ok(false, false)),
            (create(Some(true), None, None), ok(true, false)),
            (create(Some(true), Some(true), None), ok(true, false)),
            (create(Some(true), Some(true), Some(true)), ok(true, true)),
            (create(Some(true), None, Some(false)), ok(true, false)),
            (create(None, None, Some(false)), ok(false, false)),
            (create(Some(true), Some(false), None), filesystem),
            (create(Some(true), Some(false), Some(false)), filesystem),
        ] {
            assert_eq!(Lifecycle::of(&body).unwrap(), want, "{body:?}");
        }
        for (body, says) in [
            (
                create(Some(true), Some(false), Some(true)),
                "cannot be combined",
            ),
            (create(None, Some(false), None), "requires autoPause"),
            (create(Some(false), Some(false), None), "autoPauseMemory"),
            (create(None, None, Some(true)), "autoResume"),
            (create(Some(false), None, Some(true)), "autoResume"),
        ] {
            let e = Lifecycle::of(&body).unwrap_err();
            assert!(
                matches!(&e, ApiError::BadRequest(m) if m.contains(says)),
                "{body:?}: {e}"
            );
        }
        assert!(pause_keeps_memory(&PauseSandbox::default()));
        let with = |memory| PauseSandbox {
            memory: Some(memory),
            ..Default::default()
        };
        assert!(pause_keeps_memory(&with(true)));
        assert!(!pause_keeps_memory(&with(false)));
    }
}
