//! The few route-netlink requests a slot needs (links, addresses, routes), over `rtnetlink`.
//!
//! A netlink socket belongs to the network namespace of the thread that opened it, for good:
//! [`Netlink::open`] on a thread that has entered a slot's namespace configures that namespace,
//! whatever thread later drives the connection. Errors come back as `io::Error` (the kernel's
//! errno where there is one) so that `rtnetlink` stays out of this crate's public types.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// A route-netlink connection in the namespace it was opened in.
pub(crate) struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace; its task runs on the
    /// current tokio runtime (so this must be called inside one).
    pub(crate) fn open() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The index of link `name`; `None` if there is no such link.
    pub(crate) async fn index(&self, name: &str) -> io::Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    /// The index of link `name`, which must exist.
    pub(crate) async fn existing(&self, name: &str) -> io::Result<u32> {
        self.index(name)
            .await?
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    /// Creates a veth pair: `name` here, `peer` in the namespace `peer_netns` refers to
    /// (created there directly, so a same-named link here, like the host's own `eth0`, is no
    /// clash).
    pub(crate) async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let peer = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_owned())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(to_io)
    }

    /// Brings link `index` up.
    pub(crate) async fn set_up(&self, index: u32) -> io::Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(to_io)
    }

    /// Adds `addr/prefix` to link `index`, without a broadcast address (as `ip addr add` does;
    /// `rtnetlink` would add one).
    pub(crate) async fn add_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> io::Result<()> {
        let mut request = self.handle.address().add(index, addr.into(), prefix);
        request
            .message_mut()
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        request.execute().await.map_err(to_io)
    }

    /// Adds the default route through `gateway`.
    pub(crate) async fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .build();
        self.handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(to_io)
    }

    /// Deletes link `name` (a veth takes its peer with it); false if there was none.
    pub(crate) async fn delete_link(&self, name: &str) -> io::Result<bool> {
        let Some(index) = self.index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            // Gone in between (its peer's namespace went away).
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(to_io(e)),
        }
    }

    /// Every IPv4 address of this namespace.
    /// The namespace's IPv4 addresses with their prefix lengths.
    pub(crate) async fn ipv4_addresses(&self) -> io::Result<Vec<(Ipv4Addr, u8)>> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(to_io)?;
        Ok(messages
            .iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(|a| match a {
                    AddressAttribute::Local(std::net::IpAddr::V4(ip)) => {
                        Some((*ip, m.header.prefix_len))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// The name of the interface the main table's IPv4 default route goes out of, if any.
    pub(crate) async fn default_route_interface(&self) -> io::Result<Option<String>> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(to_io)?;
        let oif = routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0)
            .filter(|r| r.header.table == RouteHeader::RT_TABLE_MAIN)
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            });
        let Some(index) = oif else {
            return Ok(None);
        };
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .map_err(to_io)?;
        Ok(links
            .iter()
            .flat_map(|l| &l.attributes)
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }))
    }
}

/// The errno of a kernel refusal.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match &e {
        rtnetlink::Error::NetlinkError(m) if m.code.is_some() => m.to_io(),
        _ => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_refusal_keeps_its_errno() {
        let mut m = rtnetlink::packet_core::ErrorMessage::default();
        m.code = std::num::NonZeroI32::new(-libc::EEXIST);
        let e = rtnetlink::Error::NetlinkError(m);
        assert_eq!(errno(&e), Some(libc::EEXIST));
        assert_eq!(to_io(e).raw_os_error(), Some(libc::EEXIST));
        assert_eq!(errno(&rtnetlink::Error::RequestFailed), None);
    }
}
