//! The build VM's disk as a stack of cached layers.
//!
//! The build VM boots on an overlay of its base (the parent template's disk, or the last
//! cached layer a rebuild reuses). After each step that changes the disk, the overlay QEMU is
//! writing is frozen into a layer: a fresh overlay is attached on top of it live
//! (`blockdev-add` + `blockdev-snapshot`), and the frozen file moves into the layer cache
//! under the step's key. A layer is a qcow2 whose backing file is the layer before it, so any
//! cached layer is a complete disk (with its chain), and a rebuild boots straight on the last
//! one whose key still matches.
//!
//! QEMU opens the new overlays by path: they live in the VM's own directory, which its jail
//! shows it, and belong to its uid until frozen; in the cache they are root's and read-only.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::json;

use crate::vm::{Vm, VmError};

/// The frozen layers of one build and the overlay on top of them.
#[derive(Debug)]
pub(crate) struct LiveDisk {
    /// The block node the guest's disk is on now.
    node: String,
    /// The file behind it (host path).
    top: PathBuf,
    /// Its virtual size (new overlays get the same).
    size: u64,
    /// Overlays made so far (for unique names).
    made: usize,
}

impl LiveDisk {
    /// The disk of a VM launched on `top` (an overlay of `size` bytes; node `rootfs`).
    pub(crate) fn new(top: PathBuf, size: u64) -> Self {
        Self {
            node: "rootfs".into(),
            top,
            size,
            made: 0,
        }
    }

    /// The overlay the guest writes now.
    pub(crate) fn top(&self) -> &Path {
        &self.top
    }

    /// Freezes what the guest wrote since the last freeze into `layer` (the cache path): a new
    /// overlay backed by `layer` takes the guest's writes from now on. The guest has synced
    /// its file systems; QEMU drains and flushes the old top before switching.
    pub(crate) async fn freeze(&mut self, vm: &Vm, layer: &Path) -> Result<(), VmError> {
        self.made += 1;
        let name = format!("top{}", self.made);
        let next = vm.dir().join(format!("{name}.qcow2"));
        // `-u`: the backing file gets its name now and its content at the rename below.
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(layer)
            .arg(&next)
            .arg(self.size.to_string())
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| VmError::QemuImg(e.to_string()))?;
        if !out.status.success() {
            return Err(VmError::QemuImg(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        std::os::unix::fs::chown(&next, Some(vm.uid()), Some(vm.uid()))
            .map_err(VmError::io("chown", &next))?;
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600))
            .map_err(VmError::io("chmod", &next))?;
        let qmp = vm.qmp();
        qmp.execute_raw(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": name,
                "discard": "unmap",
                "file": {"driver": "file", "filename": next, "discard": "unmap"},
                "backing": null,
            })),
        )
        .await?;
        qmp.execute_raw(
            "blockdev-snapshot",
            Some(json!({"node": self.node, "overlay": name})),
        )
        .await?;
        // QEMU no longer writes the old top: it is the layer now.
        std::fs::rename(&self.top, layer).map_err(VmError::io("keep layer", &self.top))?;
        settle(layer)?;
        self.node = name;
        self.top = next;
        Ok(())
    }
}

/// Makes a finished layer root's and read-only for everyone else.
pub(crate) fn settle(path: &Path) -> Result<(), VmError> {
    std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(VmError::io("chown", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(VmError::io("chmod", path))
}

/// Writes the chain at `top` into `out` as one qcow2 layer on `base` (a layer of that chain):
/// a template keeps one layer of its own, whatever its build's step count, so disk chains stay
/// short and the layer cache can be collected without looking at templates.
///
/// A copy of the top, rebased (safely) onto `base`: the rebase writes into it every cluster
/// the layers between them hold. Not `qemu-img convert -B`, which copies only what the top
/// itself holds: it takes the new backing file to be the top's own backing chain.
pub(crate) async fn flatten(top: &Path, base: &Path, out: &Path) -> Result<(), VmError> {
    std::fs::copy(top, out).map_err(VmError::io("copy the top layer", top))?;
    let res = tokio::process::Command::new("qemu-img")
        .args(["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| VmError::QemuImg(e.to_string()))?;
    if !res.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(VmError::QemuImg(
            String::from_utf8_lossy(&res.stderr).trim().to_owned(),
        ));
    }
    settle(out)
}
