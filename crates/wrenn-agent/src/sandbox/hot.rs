//! Hot sandboxes: restored ahead of time, warmed through the paths every sandbox's first
//! requests take, and parked without identity until a create gives them one.
//!
//! After a restore the guest's code must be translated again by TCG (and paged in under any
//! accelerator): that, not the restore, is most of the time to a sandbox's first answers. A
//! hot sandbox has already run envd's health check, a login-shell command and a file write
//! and read, so a create that takes one is answered by code that is ready. The warm-up leaves
//! nothing in the guest (its file is removed, its commands have exited, it logs nothing), and
//! the create's `/init` gives the guest everything a fresh restore's would: the sandbox's
//! token and env vars, the clock and fresh host entropy for the kernel RNG.

use std::time::Duration;

use super::{Deadlines, InitConfig, Sandbox, SandboxError, SandboxNet, identity, init_body};
use crate::build::{Guest, GuestError, RunAs};
use crate::runtime::SandboxMeta;

/// Where the warm-up's file goes (removed afterwards).
const WARM_FILE: &str = "/tmp/.wrenn-warm-up";

/// Why a warm-up failed.
#[derive(Debug, thiserror::Error)]
#[error("warm-up step {step}")]
pub struct WarmUpError {
    step: &'static str,
    #[source]
    source: GuestError,
}

impl<N: SandboxNet> Sandbox<N> {
    /// Runs, as `user`, what a new sandbox's first client does: a login-shell command, a file
    /// written and read back; then removes the file. The guest keeps nothing of it.
    pub async fn warm_up(&self, user: &str, timeout: Duration) -> Result<(), WarmUpError> {
        // JSON, as the SDKs speak it: envd's JSON paths are other code than its protobuf ones.
        let guest = Guest::new(
            self.net.envd_addr(),
            self.init.access_token.clone().unwrap_or_default(),
        )
        .with_json();
        let how = RunAs {
            user: user.to_owned(),
            cwd: None,
            envs: Vec::new(),
        };
        let fail = |step| move |source| WarmUpError { step, source };
        let quiet = &mut |_: crate::build::Stream, _: &str| {};
        // With output, so the output events' paths run too.
        (guest.run("echo warm", &how, timeout, quiet).await).map_err(fail("command"))?;
        let data = b"warm".to_vec();
        (guest.write_file(WARM_FILE, user, data.clone()).await).map_err(fail("write"))?;
        let read = (guest.read_file(WARM_FILE, user).await).map_err(fail("read"))?;
        if read != data {
            let source = GuestError::File {
                path: WARM_FILE.into(),
                source: "read back other bytes than were written".into(),
            };
            return Err(WarmUpError {
                step: "read",
                source,
            });
        }
        let rm = format!("rm -f {WARM_FILE}");
        match guest.run(&rm, &how, timeout, quiet).await {
            Ok(0) => Ok(()),
            Ok(code) => Err(WarmUpError {
                step: "clean up",
                source: GuestError::File {
                    path: WARM_FILE.into(),
                    source: format!("rm exited with {code}").into(),
                },
            }),
            Err(e) => Err(fail("clean up")(e)),
        }
    }

    /// Gives a hot sandbox its identity: `meta` in its record and on its slot's metadata
    /// endpoint, then `/init` with `init` (its token and env vars), the clock and fresh
    /// entropy. On failure the sandbox is no one's: the caller kills it.
    pub async fn assume(
        &mut self,
        meta: SandboxMeta,
        init: InitConfig,
        deadlines: &Deadlines,
    ) -> Result<(), SandboxError> {
        // envd accepts the new token only once the slot publishes its hash.
        self.net.publish(Some(identity(
            Some(&meta),
            &self.root,
            &self.template.dir,
            &init,
        )));
        let body = init_body(&init)?;
        self.envd
            .init(&body, deadlines.init)
            .await
            .map_err(SandboxError::envd("init"))?;
        self.init = init;
        self.rec.set_meta(Some(meta));
        self.record_running().await
    }
}
