//! Parsing of `/proc/net/tcp` and `/proc/net/tcp6`: which sockets listen, where, under which inode.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The `st` column value of a listening socket (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";

/// One listening socket as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Listener {
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    /// The socket inode: stable for the socket's life, new when a listener is reopened.
    pub(crate) inode: u64,
}

/// The listening sockets in the text of one `/proc/net/tcp{,6}` file.
///
/// Lines that do not parse are skipped: the format is the kernel's, and one odd line must not
/// hide the others.
pub(crate) fn parse_listeners(text: &str) -> Vec<Listener> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Listener> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || fields[3] != TCP_LISTEN {
        return None;
    }
    let (addr_hex, port_hex) = fields[1].split_once(':')?;
    let addr = parse_addr(addr_hex)?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let inode: u64 = fields[9].parse().ok()?;
    if inode == 0 {
        return None;
    }
    Some(Listener { addr, port, inode })
}

/// The kernel prints the address as 32-bit words in host byte order (`%08X` of the raw
/// network-order word), one word for IPv4 and four for IPv6.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

fn word(hex: &str) -> Option<[u8; 4]> {
    Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
}

/// Whether `addr` is reachable only from inside the guest: 127.0.0.0/8, `::1`, or
/// `::ffff:127.x.y.z`.
pub(crate) fn is_loopback(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `addr` with a v4-mapped IPv6 address turned into the IPv4 address it stands for.
pub(crate) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex4(a: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(a.octets()))
    }

    fn hex6(a: Ipv6Addr) -> String {
        a.octets()
            .chunks_exact(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    #[test]
    fn parses_v4_listeners_and_skips_other_states() {
        let text = format!(
            "{HEADER}   0: {}:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
             \x20  1: {}:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n\
             \x20  2: {}:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 888 1 0000000000000000 20 4 30 10 -1\n\
             garbage line\n",
            hex4(Ipv4Addr::LOCALHOST),
            hex4(Ipv4Addr::UNSPECIFIED),
            hex4(Ipv4Addr::LOCALHOST),
        );
        let got = parse_listeners(&text);
        assert_eq!(
            got,
            vec![
                Listener {
                    addr: Ipv4Addr::LOCALHOST.into(),
                    port: 8080,
                    inode: 12345
                },
                Listener {
                    addr: Ipv4Addr::UNSPECIFIED.into(),
                    port: 80,
                    inode: 777
                },
            ]
        );
    }

    #[test]
    fn parses_v6_and_v4_mapped() {
        let mapped = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped();
        let text = format!(
            "{HEADER}   0: {}:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 42 1 0000000000000000 100 0 0 10 0\n\
             \x20  1: {}:0BB9 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43 1 0000000000000000 100 0 0 10 0\n",
            hex6(Ipv6Addr::LOCALHOST),
            hex6(mapped),
        );
        let got = parse_listeners(&text);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Listener {
                addr: Ipv6Addr::LOCALHOST.into(),
                port: 3000,
                inode: 42
            }
        );
        assert_eq!(got[1].addr, IpAddr::V6(mapped));
        assert!(is_loopback(got[0].addr));
        assert!(is_loopback(got[1].addr));
        assert_eq!(canonical(got[1].addr), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn loopback_classification() {
        assert!(is_loopback("127.0.0.1".parse().unwrap()));
        assert!(is_loopback("127.1.2.3".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
        assert!(!is_loopback("169.254.0.21".parse().unwrap()));
        assert!(!is_loopback("::".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.5".parse().unwrap()));
    }

    #[test]
    fn reads_this_hosts_tables() {
        // Whatever is listening here, the real files must parse without panicking.
        for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(f) {
                let _ = parse_listeners(&text);
            }
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert!(
            parse_listeners(&text)
                .iter()
                .any(|x| x.port == port && x.addr == IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }
}
