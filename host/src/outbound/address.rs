//! Which addresses a guest may reach through a name: the classifier of
//! destination addresses.
//!
//! A name in `allow_outbound` says which *names* a guest may ask for; it
//! says nothing about where the name leads today. Whoever controls the
//! name's DNS records (or the guest, through a name like `127.1` that a
//! resolver reads as an address) can point it anywhere: at the host's own
//! loopback listeners, at the private network behind it, at a cloud's
//! metadata service. So every address a name resolves to is classified
//! here, and only [`AddressClass::Public`] ones may be reached through a
//! name or a wildcard; the others only through a rule that is that IP
//! literal.
//!
//! The classifier is deliberately wider than "private": it follows the
//! IANA special-purpose registries (RFC 6890 and its updates), and treats
//! everything that is not known to be globally routable unicast as not
//! public. IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`,
//! NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are classified by the address
//! they carry.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What an address is, as far as outbound policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Globally routable unicast: reachable through names and wildcards.
    Public,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`: the host itself.
    Loopback,
    /// RFC 1918: `10/8`, `172.16/12`, `192.168/16`.
    Private,
    /// `100.64.0.0/10`: carrier-grade NAT.
    SharedAddressSpace,
    /// `169.254/16`, `fe80::/10`.
    LinkLocal,
    /// A cloud metadata service (`169.254.169.254`, `fd00:ec2::254`, …),
    /// named apart for the log even where its range is caught anyway.
    Metadata,
    /// `fc00::/7`.
    UniqueLocal,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`,
    /// `3fff::/20`.
    Documentation,
    /// `198.18/15`, `2001:2::/48`.
    Benchmarking,
    /// Anything else outside global unicast: reserved, deprecated or
    /// protocol-specific ranges.
    Reserved,
}

impl AddressClass {
    /// Whether a name may lead there.
    pub fn is_public(self) -> bool {
        self == AddressClass::Public
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Public => "a public address",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private address",
            AddressClass::SharedAddressSpace => "a carrier-grade NAT address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Metadata => "a cloud metadata address",
            AddressClass::UniqueLocal => "a unique local address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Broadcast => "the broadcast address",
            AddressClass::Documentation => "a documentation address",
            AddressClass::Benchmarking => "a benchmarking address",
            AddressClass::Reserved => "a reserved address",
        })
    }
}

/// Cloud metadata services, by address.
const METADATA: [IpAddr; 5] = [
    // AWS, GCP, Azure, DigitalOcean, OpenStack, …
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    // AWS ECS task metadata.
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    // Alibaba Cloud.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // Oracle Cloud.
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    // AWS over IPv6.
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// The class of `ip`.
pub fn classify(ip: IpAddr) -> AddressClass {
    if METADATA.contains(&ip) {
        return AddressClass::Metadata;
    }
    match ip {
        IpAddr::V4(ip) => classify_v4(ip),
        IpAddr::V6(ip) => classify_v6(ip),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    const RANGES: &[([u8; 4], u32, AddressClass)] = &[
        ([0, 0, 0, 0], 8, AddressClass::Unspecified),
        ([10, 0, 0, 0], 8, AddressClass::Private),
        ([100, 64, 0, 0], 10, AddressClass::SharedAddressSpace),
        ([127, 0, 0, 0], 8, AddressClass::Loopback),
        ([169, 254, 0, 0], 16, AddressClass::LinkLocal),
        ([172, 16, 0, 0], 12, AddressClass::Private),
        // IETF protocol assignments.
        ([192, 0, 0, 0], 24, AddressClass::Reserved),
        ([192, 0, 2, 0], 24, AddressClass::Documentation),
        // The deprecated 6to4 relay anycast.
        ([192, 88, 99, 0], 24, AddressClass::Reserved),
        ([192, 168, 0, 0], 16, AddressClass::Private),
        ([198, 18, 0, 0], 15, AddressClass::Benchmarking),
        ([198, 51, 100, 0], 24, AddressClass::Documentation),
        ([203, 0, 113, 0], 24, AddressClass::Documentation),
        ([224, 0, 0, 0], 4, AddressClass::Multicast),
        ([255, 255, 255, 255], 32, AddressClass::Broadcast),
        ([240, 0, 0, 0], 4, AddressClass::Reserved),
    ];
    RANGES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map_or(AddressClass::Public, |(_, _, class)| *class)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The IPv4 address in the low 32 bits.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    // Truncation keeps exactly the low 32 bits.
    Ipv4Addr::from(u128::from(ip) as u32)
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let net = |s: [u16; 8]| Ipv6Addr::from(s);
    if ip.is_unspecified() {
        return AddressClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify(v4.into());
    }
    // Well-known NAT64 prefix: the IPv4 address decides.
    if in_v6(ip, net([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]), 96) {
        return classify(low_v4(ip).into());
    }
    // 6to4: the IPv4 address sits in bits 16..48.
    if in_v6(ip, net([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16) {
        let [_, hi, lo, ..] = ip.segments();
        let v4 = Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
        return classify(v4.into());
    }
    #[rustfmt::skip]
    const RANGES: &[([u16; 8], u32, AddressClass)] = &[
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, AddressClass::Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, AddressClass::Documentation),
        ([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, AddressClass::Benchmarking),
        // IETF protocol assignments (Teredo, ORCHID, …).
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, AddressClass::Reserved),
        // Segment routing SIDs.
        ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, AddressClass::Reserved),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, AddressClass::UniqueLocal),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, AddressClass::LinkLocal),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, AddressClass::Multicast),
        // Global unicast; everything outside it is not (yet) routable:
        // IPv4-compatible `::a.b.c.d`, discard-only `100::/64`, local-use
        // NAT64 `64:ff9b:1::/48`, deprecated site-local `fec0::/10`, …
        ([0x2000, 0, 0, 0, 0, 0, 0, 0], 3, AddressClass::Public),
    ];
    RANGES
        .iter()
        .find(|(range, prefix, _)| in_v6(ip, net(*range), *prefix))
        .map_or(AddressClass::Reserved, |(_, _, class)| *class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> AddressClass {
        classify(ip.parse().unwrap())
    }

    #[test]
    fn public_addresses_are_public() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4007:80e::200e",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(class(ip), AddressClass::Public, "{ip}");
        }
    }

    #[test]
    fn every_non_public_range_is_named() {
        use AddressClass::*;
        for (ip, expected) in [
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("::1", Loopback),
            ("10.0.0.5", Private),
            ("10.255.255.255", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("169.254.0.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("100.100.100.200", Metadata),
            ("192.0.0.192", Metadata),
            ("fd00:ec2::254", Metadata),
            ("fc00::1", UniqueLocal),
            ("fdff:ffff::1", UniqueLocal),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("255.255.255.255", Broadcast),
            ("192.0.2.1", Documentation),
            ("198.51.100.1", Documentation),
            ("203.0.113.1", Documentation),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("2001:2::1", Benchmarking),
            ("192.0.0.1", Reserved),
            ("192.88.99.1", Reserved),
            ("240.0.0.1", Reserved),
            ("2001::1", Reserved),
            ("5f00::1", Reserved),
            ("fec0::1", Reserved),
            ("100::1", Reserved),
            ("4000::1", Reserved),
            ("::10.0.0.1", Reserved),
            ("64:ff9b:1::1", Reserved),
        ] {
            assert_eq!(class(ip), expected, "{ip}");
            assert!(!expected.is_public());
        }
    }

    #[test]
    fn ipv6_forms_carrying_ipv4_are_judged_by_the_ipv4_address() {
        assert_eq!(class("::ffff:127.0.0.1"), AddressClass::Loopback);
        assert_eq!(class("::ffff:169.254.169.254"), AddressClass::Metadata);
        assert_eq!(class("::ffff:10.1.2.3"), AddressClass::Private);
        assert_eq!(class("64:ff9b::7f00:1"), AddressClass::Loopback);
        assert_eq!(class("64:ff9b::a9fe:a9fe"), AddressClass::Metadata);
        assert_eq!(class("2002:c0a8:0101::1"), AddressClass::Private);
        assert_eq!(class("2002:7f00:0001::"), AddressClass::Loopback);
    }

    #[test]
    fn classes_read_well_in_a_log_line() {
        assert_eq!(AddressClass::Loopback.to_string(), "a loopback address");
        assert_eq!(
            AddressClass::Metadata.to_string(),
            "a cloud metadata address"
        );
    }
}
