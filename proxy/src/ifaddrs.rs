//! The machine's own interface addresses, read with getifaddrs(3). A proxy listening on the
//! unspecified address answers on every one of them, so each is one of its own addresses and
//! is refused as a destination (a request to itself would loop).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Every IPv4 and IPv6 address configured on an interface now; empty if they cannot be read.
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: on success getifaddrs points `head` at a list that stays valid until the
    // freeifaddrs call below; on failure it is left null and nothing needs freeing.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is a member of the list returned above, which has not been freed.
        let ifa = unsafe { &*node };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` is non-null and points at a sockaddr whose family field says
            // which concrete sockaddr type it is; we read only the matching type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The proxy's own socket addresses: each listener as bound, and for a listener on the
/// unspecified address its port on every interface address.
pub fn own_addresses(listeners: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut own = listeners.to_vec();
    if listeners.iter().any(|l| l.ip().is_unspecified()) {
        let interfaces = interface_addresses();
        for listener in listeners.iter().filter(|l| l.ip().is_unspecified()) {
            own.extend(
                interfaces
                    .iter()
                    .filter(|ip| ip.is_ipv4() == listener.is_ipv4() || listener.is_ipv6())
                    .map(|ip| SocketAddr::new(*ip, listener.port())),
            );
        }
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_interface_is_listed() {
        assert!(interface_addresses().contains(&IpAddr::from([127, 0, 0, 1])));
    }

    #[test]
    fn an_unspecified_listener_owns_its_port_on_every_interface() {
        let own = own_addresses(&[
            "0.0.0.0:3128".parse().unwrap(),
            "127.0.0.1:9090".parse().unwrap(),
        ]);
        assert!(own.contains(&"127.0.0.1:3128".parse().unwrap()));
        assert!(own.contains(&"127.0.0.1:9090".parse().unwrap()));
        assert!(!own.contains(&"127.0.0.1:9091".parse().unwrap()));
        let specific = own_addresses(&["127.0.0.1:3128".parse().unwrap()]);
        assert_eq!(
            specific,
            vec!["127.0.0.1:3128".parse::<SocketAddr>().unwrap()]
        );
    }
}
