//! Network slots: one network namespace per sandbox, identical inside so one memory snapshot
//! restores into any slot.
//!
//! Inside namespace `wrenn-slot-<i>`: tap `tap0` at `169.254.0.22/30` for QEMU (the guest is
//! `169.254.0.21`), and `eth0`, one end of a veth pair whose host end is `wrv<i>`. The pair
//! carries a /31 from `10.12.0.0/16`. nftables in the namespace DNATs traffic for the
//! namespace's veth address to the guest and masquerades the guest's traffic, so the host
//! reaches envd at [`Slot::guest_endpoint`]. Deleting the namespace removes the tap, both veth
//! ends and the rules with it; that is what [`Drop`] does.
//!
//! Shells out to `ip` and `nft` for now.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The tap QEMU attaches to, inside the namespace.
pub const TAP_NAME: &str = "tap0";
/// The guest's address in every slot.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The tap's address in every slot (the guest's gateway).
pub const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Slots are numbered below this: two addresses each in `10.12.0.0/16`.
pub const MAX_SLOTS: u32 = 1 << 15;

/// Why a slot could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The index is out of range.
    #[error("slot index {0} is not below {MAX_SLOTS}")]
    BadIndex(u32),
    /// A command failed.
    #[error("{cmd} failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its error output.
        stderr: String,
    },
}

/// A network slot. Dropping it deletes the namespace and everything in it.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    netns: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl Slot {
    /// Creates slot `index`. A stale namespace of the same name (a crashed agent's) is removed
    /// first.
    pub fn create(index: u32) -> Result<Self, SlotError> {
        if index >= MAX_SLOTS {
            return Err(SlotError::BadIndex(index));
        }
        let base = u32::from(Ipv4Addr::new(10, 12, 0, 0)) + 2 * index;
        let slot = Slot {
            index,
            netns: format!("wrenn-slot-{index}"),
            host_veth: format!("wrv{index}"),
            host_ip: Ipv4Addr::from(base),
            ns_ip: Ipv4Addr::from(base + 1),
        };
        if slot.netns_path().exists() {
            tracing::warn!(netns = %slot.netns, "removing a stale slot namespace");
            slot.remove();
        }
        // From here on, a failure drops `slot`, which deletes whatever was created.
        let ns = slot.netns.as_str();
        let (host, peer) = (slot.host_ip.to_string(), slot.ns_ip.to_string());
        ip(&["netns", "add", ns])?;
        ip(&[
            "link",
            "add",
            &slot.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        ip(&["addr", "add", &format!("{host}/31"), "dev", &slot.host_veth])?;
        ip(&["link", "set", &slot.host_veth, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{peer}/31"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "tuntap", "add", TAP_NAME, "mode", "tap"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{TAP_IP}/30"),
            "dev",
            TAP_NAME,
        ])?;
        ip(&["-n", ns, "link", "set", TAP_NAME, "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &host])?;
        run(
            Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ]),
            None,
        )?;
        let rules = format!(
            "table ip wrenn {{\n\
             \tchain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"eth0\" ip daddr {peer} dnat to {GUEST_IP}\n\t}}\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"eth0\" ip saddr {GUEST_IP} masquerade\n\t}}\n}}\n"
        );
        run(
            Command::new("ip").args(["netns", "exec", ns, "nft", "-f", "-"]),
            Some(&rules),
        )?;
        Ok(slot)
    }

    /// The slot's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The namespace name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The namespace's bind-mounted file, for `setns`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// The host end of the veth pair.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// Where the host reaches `port` on the guest (DNAT'd to [`GUEST_IP`]).
    pub fn guest_endpoint(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ns_ip, port))
    }

    fn remove(&self) {
        // Deleting the namespace destroys the tap, the veth pair (both ends) and its rules.
        if let Err(err) = ip(&["netns", "del", &self.netns]) {
            tracing::warn!(%err, netns = %self.netns, "could not delete slot namespace");
        }
        // A host end left behind by a partial setup (namespace creation failed after it).
        if std::path::Path::new("/sys/class/net")
            .join(&self.host_veth)
            .exists()
        {
            let _ = ip(&["link", "del", &self.host_veth]);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(args: &[&str]) -> Result<(), SlotError> {
    run(Command::new("ip").args(args), None)
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<(), SlotError> {
    let fail = |cmd: &Command, stderr: String| SlotError::Command {
        cmd: format!("{cmd:?}"),
        stderr,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| fail(cmd, e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| fail(cmd, e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(cmd, e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            cmd,
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}
