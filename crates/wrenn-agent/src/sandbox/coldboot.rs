//! Cold boots of a paused disk: the resume of a filesystem-only pause (or one asked to reboot)
//! boots the template's kernel and initramfs on the sandbox's disk, as a template build boots
//! its parent, instead of restoring memory.
//!
//! The guest's RAM is still a private mapping of the template's memory file (the boot writes
//! whatever it uses), so a later full pause diffs against the template like any sandbox's,
//! and its resume restores exactly what the guest had. After `/init`, the template's start
//! command (if it has one) is started again and its ready command waited for, as the build
//! did before the template's snapshot: a code interpreter's server runs again.

use std::time::{Duration, Instant};

use super::{Deadlines, PausedSandbox, Sandbox, SandboxError, SandboxNet, VM_DIR};
use crate::build::{Defaults, Guest, RunAs};
use crate::snapshot::Snapshot;
use crate::vm::{Launch, Memory, Vm};

/// How long a template's ready command may take to succeed after a cold boot.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

impl PausedSandbox {
    /// Boots `template`'s kernel on a new run overlay `run_disk` on the paused disk, in `net`.
    pub(super) async fn boot_cold<N: SandboxNet>(
        &self,
        template: &Snapshot,
        run_disk: &str,
        net: &N,
    ) -> Result<Vm, SandboxError> {
        let m = self.manifest();
        let vm_dir = self.root().join(VM_DIR);
        self.start_qemu(run_disk, net, |run_path| async move {
            let vm = Vm::launch(Launch {
                spec: m.spec.clone(),
                dir: vm_dir,
                disk: run_path,
                memory: Memory::Private(template.memory_path()),
                net: Some(net.attach()),
                incoming: None,
                extra_disks: vec![],
            })
            .await?;
            Ok(vm)
        })
        .await
    }
}

impl<N: SandboxNet> Sandbox<N> {
    /// Starts the template's start command again after a cold boot, detached (envd keeps it
    /// running), and polls its ready command. Best effort: the sandbox runs either way, and a
    /// start command that fails is logged, as the guest's own services would be.
    pub(super) async fn start_template_command(&self, deadlines: &Deadlines) {
        let defaults = Defaults::read(&self.template.dir, Defaults::default());
        let Some(start) = defaults.start_cmd.filter(|c| !c.trim().is_empty()) else {
            return;
        };
        let guest = Guest::new(
            self.net.envd_addr(),
            self.init.access_token.clone().unwrap_or_default(),
        );
        let how = RunAs {
            user: (self.init.default_user.clone())
                .or(defaults.user)
                .unwrap_or_else(|| "root".into()),
            cwd: self.init.default_workdir.clone().or(defaults.workdir),
            envs: defaults.envs,
        };
        // `setsid`: the command outlives the shell that starts it, in a session of its own.
        let detached = format!(
            "setsid /bin/bash -l -c {} </dev/null >/dev/null 2>&1 &",
            shell_quote(&start)
        );
        let ran = guest
            .run(&detached, &how, deadlines.init, &mut |_, _| {})
            .await;
        if let Err(e) = ran {
            tracing::warn!(error = %crate::error_chain(&e), "start the template's start command after a cold boot");
            return;
        }
        let Some(ready) = defaults.ready_cmd else {
            return;
        };
        let until = Instant::now() + READY_TIMEOUT;
        while Instant::now() < until {
            match (guest.run(&ready, &how, deadlines.init, &mut |_, _| {})).await {
                Ok(0) => return,
                Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        tracing::warn!(%ready, "the template's ready command did not succeed after a cold boot");
    }
}

/// `s` as one single-quoted shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
