//! The host side of guest egress: guests' traffic leaves the host only by one uplink
//! interface, masqueraded to its address.
//!
//! Each agent owns one nftables table in the host's namespace, `inet wrenn-host-<first slot>`,
//! whose rules match only its own slots' veth addresses, so agents with other slot ranges
//! (tests run several) neither see nor undo each other's rules. A packet from one of its
//! slots is forwarded only out of the uplink and masqueraded there; anything else from a slot
//! (another host interface, another slot) is refused; toward a slot only replies pass. The
//! per-slot firewall has already judged the packet by then (see `crate::firewall`); this is
//! the second fence, and the one that makes "the uplink" true: with no uplink, nothing from
//! the agent's slots is forwarded at all. Its input chain refuses every connection a slot
//! opens to the host itself (the host only answers what it opened, envd's traffic), whatever
//! address of the host it was sent to: this fence does not depend on knowing the host's
//! addresses, which the slots' own guard has to keep current. (The range holds the host's
//! own veth addresses too; the host's traffic to them arrives on loopback and is let be.)
//!
//! Forwarding has to be on for routing to happen (`net.ipv4.ip_forward`). It is a host-wide
//! switch: turned on when an agent with an uplink starts, never turned off (other agents, or
//! other software, may rely on it). The table's forward chain accepts what is not ours, so
//! the host's other forwarding is as before.

use std::net::Ipv4Addr;

use crate::firewall;
use crate::netlink::Netlink;
use crate::slot::{MAX_SLOTS, SlotError, slot_addresses};

/// The table of the agent whose slots start at `first`.
fn table_name(first: u32) -> String {
    format!("wrenn-host-{first}")
}

/// An agent's uplink rules; dropping it removes them.
#[derive(Debug)]
pub struct Uplink {
    table: String,
    interface: Option<String>,
}

impl Uplink {
    /// Installs the rules for slots `first..first + span`, with guests' traffic leaving by
    /// `interface` (`None`: guests reach nothing outside the host). Replaces an earlier
    /// table of the same slots (a crashed agent's).
    pub async fn install(
        interface: Option<&str>,
        first: u32,
        span: u32,
    ) -> Result<Self, SlotError> {
        let last = first
            .checked_add(span)
            .filter(|&l| span > 0 && l <= MAX_SLOTS);
        let Some(end) = last else {
            return Err(SlotError::BadIndex(first.saturating_add(span)));
        };
        if let Some(name) = interface {
            valid_interface(name)?;
            if !std::path::Path::new("/sys/class/net").join(name).exists() {
                return Err(SlotError::Command {
                    cmd: format!("uplink {name}"),
                    stderr: "no such interface on this host".into(),
                });
            }
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| {
                SlotError::Netns {
                    what: "turn on IPv4 forwarding",
                    netns: "host".into(),
                    source,
                }
            })?;
        }
        let (lo, _) = slot_addresses(first);
        let (_, hi) = slot_addresses(end - 1);
        let table = table_name(first);
        let rules = ruleset(&table, interface, lo, hi);
        tokio::task::spawn_blocking(move || firewall::apply(&rules))
            .await
            .map_err(|e| SlotError::Command {
                cmd: "nft -f -".into(),
                stderr: e.to_string(),
            })??;
        Ok(Self {
            table,
            interface: interface.map(str::to_owned),
        })
    }

    /// The interface guests' traffic leaves by.
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        let rules = format!("table inet {0}\ndelete table inet {0}\n", self.table);
        if let Err(error) = firewall::apply(&rules) {
            tracing::warn!(%error, table = %self.table, "could not remove the uplink rules");
        }
    }
}

/// The interface of the host's IPv4 default route, the default uplink.
pub async fn default_uplink() -> std::io::Result<Option<String>> {
    Netlink::open()?.default_route_interface().await
}

/// Interface names go into the ruleset as quoted strings: only what Linux allows in a name
/// and nft cannot misread.
fn valid_interface(name: &str) -> Result<(), SlotError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(SlotError::Command {
            cmd: format!("uplink {name:?}"),
            stderr: "not a valid interface name".into(),
        })
    }
}

fn ruleset(table: &str, interface: Option<&str>, lo: Ipv4Addr, hi: Ipv4Addr) -> String {
    let slots = format!("{lo}-{hi}");
    let out = match interface {
        Some(ifname) => format!(
            "\t\tip saddr {slots} oifname \"{ifname}\" accept\n\
             \t\tip saddr {slots} counter reject with icmpx admin-prohibited\n"
        ),
        None => format!("\t\tip saddr {slots} counter reject with icmpx admin-prohibited\n"),
    };
    let nat = match interface {
        Some(ifname) => format!(
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {slots} oifname \"{ifname}\" masquerade\n\t}}\n"
        ),
        None => String::new(),
    };
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"lo\" accept\n\
         \t\tip saddr {slots} ct state established,related accept\n\
         \t\tip saddr {slots} counter reject with icmpx admin-prohibited\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         {out}\
         \t\tip daddr {slots} ct state established,related accept\n\
         \t\tip daddr {slots} counter drop\n\t}}\n\
         {nat}}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_only_the_agents_slots() {
        let (lo, _) = slot_addresses(100);
        let (_, hi) = slot_addresses(109);
        let r = ruleset("wrenn-host-100", Some("up0"), lo, hi);
        assert!(r.starts_with("table inet wrenn-host-100\ndelete table inet wrenn-host-100\n"));
        assert!(r.contains("ip saddr 10.12.0.200-10.12.0.219 oifname \"up0\" accept"));
        assert!(r.contains("ip saddr 10.12.0.200-10.12.0.219 oifname \"up0\" masquerade"));
        let none = ruleset("wrenn-host-100", None, lo, hi);
        assert!(!none.contains("oifname") && !none.contains("masquerade"));
        assert!(none.contains("ip saddr 10.12.0.200-10.12.0.219 counter reject"));
        assert!(r.contains("chain input") && none.contains("chain input"));
        // The host's own traffic to its slot-side addresses comes in on loopback, from an
        // address in the range.
        assert!(
            r.contains("\t\tiifname \"lo\" accept\n\t\tip saddr 10.12.0.200-10.12.0.219 ct state")
        );
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_interface("eth0").is_ok());
        assert!(valid_interface("veth-up.1").is_ok());
        for bad in ["", "a\"b", "x y", "sixteen-chars-xx", "a;b"] {
            assert!(valid_interface(bad).is_err(), "{bad:?}");
        }
    }
}
