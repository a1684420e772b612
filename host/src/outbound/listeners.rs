//! The host's own listeners, which no guest may reach.
//!
//! A guest calling the admin API could scale, deploy or read dead letters
//! (on loopback the API asks for no token unless one is configured); a
//! guest calling the HTTP front could call itself in a loop. The rules
//! alone cannot stop either when an operator allows the host's address
//! (`127.0.0.1:*`), so [`crate::run`] registers every socket it binds here
//! with [`guard_listener`], and the outbound policy refuses any connection
//! that would land on one, whatever the rules say.
//!
//! The registry is per process: one process runs one host.
//!
//! Invariant: a destination is refused when its port is a listener's and
//! its address is that listener's, or both are the host itself (loopback
//! or unspecified). A listener on every interface (`0.0.0.0`) is still
//! reachable through the host's other addresses, which names and wildcards
//! cannot lead to unless they are public — and then anyone may call it.

use std::net::SocketAddr;
use std::sync::RwLock;

static LISTENERS: RwLock<Vec<SocketAddr>> = RwLock::new(Vec::new());

/// Records `address`, a socket the host listens on, as out of guests'
/// reach.
pub fn guard_listener(address: SocketAddr) {
    let mut listeners = LISTENERS.write().unwrap_or_else(|p| p.into_inner());
    if !listeners.contains(&address) {
        listeners.push(address);
    }
}

/// The host listener a connection to `destination` would reach, if any.
pub(super) fn host_listener(destination: SocketAddr) -> Option<SocketAddr> {
    let listeners = LISTENERS.read().unwrap_or_else(|p| p.into_inner());
    listeners
        .iter()
        .copied()
        .find(|listener| reaches(destination, *listener))
}

/// Whether a connection to `destination` would land on `listener`.
fn reaches(destination: SocketAddr, listener: SocketAddr) -> bool {
    if destination.port() != listener.port() {
        return false;
    }
    let (to, on) = (
        destination.ip().to_canonical(),
        listener.ip().to_canonical(),
    );
    let this_host = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
    to == on || (this_host(to) && this_host(on))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(destination: &str, listener: &str) -> bool {
        reaches(destination.parse().unwrap(), listener.parse().unwrap())
    }

    #[test]
    fn a_listener_is_reached_through_its_address_or_the_hosts_own() {
        assert!(reach("127.0.0.1:9000", "127.0.0.1:9000"));
        assert!(reach("127.0.0.1:9000", "0.0.0.0:9000"));
        assert!(reach("0.0.0.0:9000", "127.0.0.1:9000"));
        assert!(reach("[::1]:9000", "[::]:9000"));
        assert!(reach("[::ffff:127.0.0.1]:9000", "127.0.0.1:9000"));
        assert!(reach("127.0.0.2:9000", "127.0.0.1:9000"));
        assert!(reach("10.0.0.5:9000", "10.0.0.5:9000"));
        assert!(!reach("127.0.0.1:9001", "127.0.0.1:9000"));
        assert!(!reach("10.0.0.5:9000", "127.0.0.1:9000"));
        assert!(!reach("10.0.0.6:9000", "10.0.0.5:9000"));
    }

    #[test]
    fn guarded_listeners_are_found() {
        // A port no other test guards (the registry is per process).
        guard_listener("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            host_listener("[::ffff:127.0.0.1]:1".parse().unwrap()),
            Some("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(host_listener("10.0.0.1:1".parse().unwrap()), None);
    }
}
