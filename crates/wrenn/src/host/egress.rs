//! A host's egress settings (`wrenn up`, `wrenn agent`): the uplink guests leave by, where
//! their resolver forwards, and the private ranges the operator lets them reach.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context as _, bail};
use wrenn_agent::pool::EgressSettings;
use wrenn_core::Ipv4Net;

use super::HostArgs;

/// The uplink interface (`None`: no egress at all) and the egress settings of the host.
pub(super) async fn host_settings(
    args: &HostArgs,
) -> anyhow::Result<(Option<String>, EgressSettings)> {
    let uplink = match args.uplink.as_deref() {
        Some("none") => None,
        Some(name) => Some(name.to_owned()),
        None => {
            let found = wrenn_hostnet::default_uplink()
                .await
                .context("find the default route's interface")?;
            if found.is_none() {
                tracing::warn!("no default route: guests have no internet (set --uplink)");
            }
            found
        }
    };
    let dns_upstream = match args.dns_upstream.as_deref() {
        Some(s) => Some(parse_upstream(s)?),
        None => std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|text| first_nameserver(&text)),
    };
    let mut lifted = Vec::new();
    for r in &args.egress_allow_ranges {
        lifted.push(parse_lifted(r)?);
    }
    match &uplink {
        Some(u) => {
            tracing::info!(uplink = %u, dns = ?dns_upstream, allowed = ?args.egress_allow_ranges, "guest egress")
        }
        None => tracing::info!("guest egress off: no uplink"),
    }
    Ok((
        uplink,
        EgressSettings {
            enabled: false,
            lifted,
            dns_upstream,
        },
    ))
}

/// `ADDR` or `ADDR:PORT` (IPv4; port 53 by default).
fn parse_upstream(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: Ipv4Addr = s
        .parse()
        .with_context(|| format!("--dns-upstream {s:?} is not an IPv4 address[:port]"))?;
    Ok(SocketAddr::from((ip, 53)))
}

/// The first IPv4 `nameserver` of a resolv.conf.
fn first_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .filter(IpAddr::is_ipv4)
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// A range to lift: it has to lie inside the private, CGNAT or benchmark space (the rest is
/// either allowed anyway or never allowed). The slots' own network, the host's addresses and
/// its connected networks stay denied even inside a lifted range: the guard checks them first.
fn parse_lifted(s: &str) -> anyhow::Result<Ipv4Net> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|()| anyhow::anyhow!("--egress-allow-range {s:?} is not an IPv4 CIDR block"))?;
    let liftable = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "198.18.0.0/15",
    ];
    let inside = liftable.iter().any(|r| {
        let r: Ipv4Net = r.parse().expect("a valid range");
        r.prefix() <= net.prefix() && r.contains(net.addr())
    });
    if !inside {
        bail!("--egress-allow-range {s}: only private, CGNAT or benchmark ranges can be allowed");
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_and_nameservers_parse() {
        assert_eq!(
            parse_upstream("203.0.113.53").unwrap().to_string(),
            "203.0.113.53:53"
        );
        assert_eq!(parse_upstream("127.0.0.1:5353").unwrap().port(), 5353);
        assert!(parse_upstream("resolver.test").is_err());
        let conf = "# comment\nsearch x\nnameserver fd00::1\nnameserver 198.51.100.53\nnameserver 198.51.100.54\n";
        assert_eq!(
            first_nameserver(conf).unwrap().to_string(),
            "198.51.100.53:53"
        );
        assert!(first_nameserver("search x\n").is_none());
    }

    #[test]
    fn only_private_ranges_can_be_lifted() {
        assert_eq!(
            parse_lifted("10.99.0.0/16").unwrap().to_string(),
            "10.99.0.0/16"
        );
        assert!(parse_lifted("100.100.100.200/32").is_ok());
        for bad in ["203.0.113.0/24", "0.0.0.0/0", "10.0.0.0/7", "x"] {
            assert!(parse_lifted(bad).is_err(), "{bad}");
        }
    }
}
