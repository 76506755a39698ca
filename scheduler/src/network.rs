//! What can be seen of the link to the store, for the policy engine: the
//! interface whose route reaches the store, its kind and addresses, and the
//! gateway's MAC address.
//!
//! This is the portable snapshot the daemon's watcher refreshes on every event:
//! interface addresses come from `getifaddrs` (nix) everywhere; the route, the
//! kind and the gateway's MAC come from the kernel's tables on Linux
//! (`/proc/net/route` and `/proc/net/ipv6_route`, `/sys/class/net`,
//! `/proc/net/arp` for an IPv4 gateway, the neighbour table over netlink for an
//! IPv6 one) and from `route` and `arp` elsewhere (IPv4 gateways only). Where
//! NetworkManager runs (Linux), the Wi-Fi network's name, its access point and
//! the metered flag come from it over D-Bus ([`nm`]).

use std::net::{IpAddr, ToSocketAddrs};

use homing_policy::Observation;

#[cfg(target_os = "linux")]
mod events;
#[cfg(target_os = "linux")]
pub mod nm;

/// The link to `store` (`host:port`), as far as it can be seen. `None` when the
/// store's name does not resolve.
pub fn observe(store: &str) -> Option<Link> {
    let target = store.to_socket_addrs().ok()?.next()?.ip();
    if target.is_loopback() {
        return Some(Link {
            observation: Observation {
                interface: loopback_name(),
                ..Observation::default()
            },
            loopback: true,
        });
    }
    let route = platform::route_to(target);
    let interface = route
        .as_ref()
        .map(|r| r.interface.clone())
        .or_else(first_interface)
        .unwrap_or_default();
    let addresses = addresses_of(&interface);
    let gateway_mac = route
        .as_ref()
        .and_then(|r| platform::mac_of(r.gateway?, &r.interface));
    let mut observation = Observation {
        kind: platform::kind_of(&interface),
        addresses,
        gateway_mac,
        ..Observation::default()
    };
    // Where NetworkManager runs: the Wi-Fi network and its metered flag.
    #[cfg(target_os = "linux")]
    if !interface.is_empty()
        && let Some(view) = nm::look(&interface)
    {
        observation.ssid = view.ssid;
        observation.bssid = view.bssid;
        observation.metered = view.metered;
        observation.android_metered = view.android_metered;
    }
    observation.interface = interface;
    Some(Link {
        observation,
        loopback: false,
    })
}

/// The link to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// What the policies match against.
    pub observation: Observation,
    /// The store is on this machine: no link is used.
    pub loopback: bool,
}

/// A route's interface and gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The interface.
    pub interface: String,
    /// The gateway, for routes that have one.
    pub gateway: Option<IpAddr>,
}

fn loopback_name() -> String {
    if cfg!(target_os = "linux") {
        "lo"
    } else {
        "lo0"
    }
    .to_string()
}

fn addresses_of(interface: &str) -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| {
            let address = a.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Where the kernel's tables are not read: the first interface that is up, is
/// not a loopback, and has an address.
fn first_interface() -> Option<String> {
    use nix::net::if_::InterfaceFlags;
    nix::ifaddrs::getifaddrs()
        .ok()?
        .find(|a| {
            a.flags.contains(InterfaceFlags::IFF_UP)
                && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
                && a.address.is_some_and(|s| s.as_sockaddr_in().is_some())
        })
        .map(|a| a.interface_name)
}

#[cfg(target_os = "linux")]
mod platform {
    //! Linux: the kernel's routing table, sysfs and the ARP table.

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use homing_policy::LinkKind;

    use super::Route;

    /// Route flags of <linux/route.h>: the route is up; it rejects (an
    /// unreachable or prohibit route, which reaches nothing).
    const RTF_UP: u32 = 0x0001;
    const RTF_REJECT: u32 = 0x0200;

    /// The route the kernel would take to `target`: the most specific one in
    /// `/proc/net/route` or `/proc/net/ipv6_route`, the lowest metric among
    /// equals; none when that is a route that rejects or one that is down is
    /// all there is.
    pub(super) fn route_to(target: IpAddr) -> Option<Route> {
        match target {
            IpAddr::V4(_) => {
                let table = std::fs::read_to_string("/proc/net/route").ok()?;
                parse_route(&table, target)
            }
            IpAddr::V6(v6) => {
                let table = std::fs::read_to_string("/proc/net/ipv6_route").ok()?;
                parse_route6(&table, v6)
            }
        }
    }

    /// The best IPv6 route to `target` in the text of `/proc/net/ipv6_route`:
    /// destination, prefix length, source, source prefix length, next hop,
    /// metric, reference count, use, flags (all hex; addresses in network
    /// order), device.
    pub(super) fn parse_route6(table: &str, target: Ipv6Addr) -> Option<Route> {
        let target = u128::from(target);
        // A reject route competes like any other: when it wins, the kernel
        // refuses the target, and there is no link to it.
        let mut best: Option<(u32, u32, Option<Route>)> = None;
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let number = |at: usize| u32::from_str_radix(fields[at], 16).ok();
            let (Ok(destination), Some(length), Ok(next_hop), Some(metric), Some(flags)) = (
                u128::from_str_radix(fields[0], 16),
                number(1),
                u128::from_str_radix(fields[4], 16),
                number(5),
                number(8),
            ) else {
                continue;
            };
            // (The kernel lists reject routes without RTF_UP.)
            if length > 128 || (flags & RTF_UP == 0 && flags & RTF_REJECT == 0) {
                continue;
            }
            let mask = u128::MAX.checked_shl(128 - length).unwrap_or(0);
            if target & mask != destination & mask {
                continue;
            }
            if best
                .as_ref()
                .is_some_and(|(l, m, _)| *l > length || (*l == length && *m <= metric))
            {
                continue;
            }
            let route = (flags & RTF_REJECT == 0).then(|| Route {
                interface: fields[9].to_string(),
                gateway: (next_hop != 0).then(|| IpAddr::V6(Ipv6Addr::from(next_hop))),
            });
            best = Some((length, metric, route));
        }
        best.and_then(|(_, _, route)| route)
    }

    /// The best IPv4 route to `target` in the text of `/proc/net/route`.
    pub(super) fn parse_route(table: &str, target: IpAddr) -> Option<Route> {
        let IpAddr::V4(target) = target else {
            return None;
        };
        // The kernel prints each address, a big-endian __be32, as a host-order
        // integer: its bytes in host order are the address's bytes.
        #[expect(
            clippy::host_endian_bytes,
            reason = "the kernel's table is host-endian"
        )]
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
        };
        let mut best: Option<(u32, u32, Option<Route>)> = None;
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                continue;
            }
            let (Some(destination), Some(gateway), Some(mask), Ok(flags), Ok(metric)) = (
                hex(fields[1]),
                hex(fields[2]),
                hex(fields[7]),
                u32::from_str_radix(fields[3], 16),
                fields[6].parse::<u32>(),
            ) else {
                continue;
            };
            if flags & RTF_UP == 0 && flags & RTF_REJECT == 0 {
                continue;
            }
            if u32::from(target) & mask != destination & mask {
                continue;
            }
            if best.as_ref().is_some_and(|(m, best_metric, _)| {
                m.count_ones() > mask.count_ones()
                    || (m.count_ones() == mask.count_ones() && *best_metric <= metric)
            }) {
                continue;
            }
            let route = (flags & RTF_REJECT == 0).then(|| Route {
                interface: fields[0].to_string(),
                gateway: (gateway != 0).then(|| IpAddr::V4(Ipv4Addr::from(gateway))),
            });
            best = Some((mask, metric, route));
        }
        best.and_then(|(_, _, route)| route)
    }

    /// An interface's kind, from sysfs.
    pub(super) fn kind_of(interface: &str) -> Option<LinkKind> {
        if interface.is_empty() {
            return None;
        }
        let base = std::path::Path::new("/sys/class/net").join(interface);
        if base.join("wireless").exists() {
            return Some(LinkKind::Wifi);
        }
        let uevent = std::fs::read_to_string(base.join("uevent")).unwrap_or_default();
        if uevent.lines().any(|l| l == "DEVTYPE=wwan") {
            return Some(LinkKind::Wwan);
        }
        let kind: u32 = std::fs::read_to_string(base.join("type"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // ARPHRD_* from <linux/if_arp.h>.
        match kind {
            1 => Some(LinkKind::Ethernet),
            3 => Some(LinkKind::Radio),
            512 => Some(LinkKind::Ppp),
            65534 => Some(LinkKind::Tun),
            _ => None,
        }
    }

    /// The MAC address (lower-case) of the neighbour `address` on `interface`:
    /// from the ARP table for IPv4, from the kernel's neighbour table over
    /// netlink for IPv6 (there is no file of it).
    pub(super) fn mac_of(address: IpAddr, interface: &str) -> Option<String> {
        let IpAddr::V6(v6) = address else {
            return arp(address);
        };
        use netlink_sys::protocols::NETLINK_ROUTE;
        use netlink_sys::{Socket, SocketAddr};
        const AF_INET6: u8 = 10;
        let ifindex = nix::net::if_::if_nametoindex(interface).ok()?;
        let mut socket = Socket::new(NETLINK_ROUTE).ok()?;
        socket.bind_auto().ok()?;
        socket.connect(&SocketAddr::new(0, 0)).ok()?;
        // The kernel answers at once; a sandbox that never does must not stall
        // the look at the link (and with it the daemon's runs).
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )
        .ok()?;
        socket
            .send(&super::events::neighbour_dump_request(AF_INET6), 0)
            .ok()?;
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let read = socket.recv(&mut &mut buffer[..], 0).ok()?;
            match super::events::find_neighbour(
                &buffer[..read.min(buffer.len())],
                ifindex,
                &v6.octets(),
            ) {
                super::events::Lookup::Found(mac) => return Some(mac),
                super::events::Lookup::NotThere => return None,
                super::events::Lookup::ReadOn if read == 0 => return None,
                super::events::Lookup::ReadOn => {}
            }
        }
    }

    /// The MAC address of `address` from the ARP table (lower-case).
    fn arp(address: IpAddr) -> Option<String> {
        let table = std::fs::read_to_string("/proc/net/arp").ok()?;
        let wanted = address.to_string();
        table.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4 && fields[0] == wanted && fields[3] != "00:00:00:00:00:00")
                .then(|| fields[3].to_ascii_lowercase())
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const TABLE: &str =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
wlan0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
tun0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
";

        #[test]
        fn among_equal_routes_the_lowest_metric_wins_a_reject_refuses_and_down_routes_never_count()
        {
            let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000
usb0\t00000000\t012AA8C0\t0003\t0\t0\t50\t00000000
lo\t0000000A\t00000000\t0201\t0\t0\t0\t000000FF
tun0\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF
";
            // usb0's route is the lowest metric but was listed after: still wins.
            let away = parse_route(table, "203.0.113.7".parse().unwrap()).unwrap();
            assert_eq!(away.interface, "usb0");
            // The reject /8 wins over the defaults (the route that is down does
            // not count): the kernel refuses 10.0.0.0/8, there is no link.
            assert_eq!(parse_route(table, "10.1.2.3".parse().unwrap()), None);
        }

        /// From a laptop with a Wi-Fi default route, a VPN to the home /48 and
        /// the kernel's own unreachable route.
        const TABLE6: &str = "\
20010db8000100000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     wg0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001   wlan0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000003 00000000 00000003   wlan0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe80000000000000000000000000abcd 00000064 00000003 00000000 00000003    usb0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
20010db8000200000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00000200       lo
";

        #[test]
        fn ipv6_routes_are_read_most_specific_first_then_by_metric() {
            let home = parse_route6(TABLE6, "2001:db8:1::7".parse().unwrap()).unwrap();
            assert_eq!(home.interface, "wg0");
            assert_eq!(home.gateway, None);
            // The default routes: usb0's metric (0x64) is lower than wlan0's.
            let away = parse_route6(TABLE6, "2001:db8:9::1".parse().unwrap()).unwrap();
            assert_eq!(away.interface, "usb0");
            assert_eq!(away.gateway, Some("fe80::abcd".parse().unwrap()));
            // A /64 that an unreachable route covers is refused, whatever the
            // defaults say; the kernel's own ::/0 unreachable route (metric
            // 0xffffffff) loses to every real default.
            assert_eq!(parse_route6(TABLE6, "2001:db8:2::1".parse().unwrap()), None);
            assert_eq!(parse_route6("", "2001:db8::1".parse().unwrap()), None);
            assert_eq!(
                parse_route6("garbage\n1 2 3\n", "::1".parse().unwrap()),
                None
            );
        }

        proptest::proptest! {
            #[test]
            fn any_table_text_parses_without_panicking(
                text in "([0-9a-fA-F]{0,33}[ \t]{1,3}){0,12}\n{0,2}",
                octets in proptest::array::uniform16(proptest::prelude::any::<u8>()),
            ) {
                let target = Ipv6Addr::from(octets);
                let _ = parse_route6(&text, target);
                let v4 = IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]));
                let _ = parse_route(&format!("header\n{text}"), v4);
            }
        }

        #[test]
        fn the_most_specific_route_wins() {
            let home = parse_route(TABLE, "10.1.2.3".parse().unwrap()).unwrap();
            assert_eq!(home.interface, "tun0");
            assert_eq!(home.gateway, None);
            let lan = parse_route(TABLE, "192.168.1.20".parse().unwrap()).unwrap();
            assert_eq!(lan.interface, "wlan0");
            assert_eq!(lan.gateway, None);
            let away = parse_route(TABLE, "203.0.113.7".parse().unwrap()).unwrap();
            assert_eq!(away.interface, "wlan0");
            assert_eq!(away.gateway, Some("192.168.1.1".parse().unwrap()));
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod platform {
    //! Elsewhere (OpenBSD, macOS, the other BSDs): the route and the gateway's
    //! MAC from the system's own `route -n get` and `arp -n`, whose output the
    //! portable parsers below read; the kind is not known.

    use std::net::IpAddr;
    use std::process::Command;

    use homing_policy::LinkKind;

    use super::Route;

    fn run(program: &str, args: &[&str]) -> Option<String> {
        let out = Command::new(program).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(super) fn route_to(target: IpAddr) -> Option<Route> {
        let family = if target.is_ipv6() { "-inet6" } else { "-inet" };
        let text = run("route", &["-n", "get", family, &target.to_string()])?;
        super::parse_bsd_route_get(&text)
    }

    pub(super) fn kind_of(_interface: &str) -> Option<LinkKind> {
        None
    }

    /// IPv4 only (`arp`); an IPv6 gateway's MAC is left unknown here.
    pub(super) fn mac_of(address: IpAddr, _interface: &str) -> Option<String> {
        if address.is_ipv6() {
            return None;
        }
        let text = run("arp", &["-n", &address.to_string()])?;
        super::parse_bsd_arp(&text, address)
    }
}

/// The route in the output of BSD `route -n get TARGET` (OpenBSD, macOS,
/// FreeBSD): its `interface:` and `gateway:` lines. A gateway that is not an
/// address (`link#5` for a directly connected network) is none.
#[cfg(any(not(target_os = "linux"), test))]
fn parse_bsd_route_get(text: &str) -> Option<Route> {
    let mut interface = None;
    let mut gateway = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(value) = line.strip_prefix("interface:") {
            interface = Some(value.trim().to_string()).filter(|i| !i.is_empty());
        } else if let Some(value) = line.strip_prefix("gateway:") {
            // An IPv6 link-local gateway carries its zone (`fe80::1%en0`).
            let value = value.trim();
            let value = value.split('%').next().unwrap_or(value);
            gateway = value.parse::<IpAddr>().ok();
        }
    }
    Some(Route {
        interface: interface?,
        gateway,
    })
}

/// The MAC address of `address` in the output of BSD `arp -n ADDRESS`:
/// macOS's `? (192.168.1.1) at a4:2b:b0:1:2:3 on en0 ...` (octets without
/// their leading zero) or OpenBSD's table row `192.168.1.1 00:11:22:33:44:55
/// em0 ...`; lower-case, two digits an octet. An incomplete entry is none.
#[cfg(any(not(target_os = "linux"), test))]
fn parse_bsd_arp(text: &str, address: IpAddr) -> Option<String> {
    let wanted = address.to_string();
    let bracketed = format!("({wanted})");
    text.lines()
        .filter(|line| {
            line.split_whitespace()
                .any(|word| word == wanted || word == bracketed)
        })
        .flat_map(str::split_whitespace)
        .find_map(|word| {
            let octets: Vec<&str> = word.split(':').collect();
            if octets.len() != 6 {
                return None;
            }
            let octets: Vec<u8> = octets
                .iter()
                .map(|o| {
                    if o.is_empty() || o.len() > 2 {
                        None
                    } else {
                        u8::from_str_radix(o, 16).ok()
                    }
                })
                .collect::<Option<_>>()?;
            Some(mac_string(&octets))
        })
}

/// A hardware address as policies write it: lower-case hex octets joined by `:`.
fn mac_string(octets: &[u8]) -> String {
    octets
        .iter()
        .map(|o| format!("{o:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod bsd_tests {
    use super::*;

    #[test]
    fn macos_and_openbsd_routes_are_read_from_route_get() {
        let macos = "   route to: 203.0.113.7
destination: default
       mask: default
    gateway: 192.168.1.1
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
";
        assert_eq!(
            parse_bsd_route_get(macos),
            Some(Route {
                interface: "en0".into(),
                gateway: Some("192.168.1.1".parse().unwrap()),
            })
        );
        let openbsd_lan = "   route to: 10.0.0.9
destination: 10.0.0.0
       mask: 255.255.255.0
    gateway: link#1
  interface: em0
 if address: 10.0.0.5
   priority: 4 (connected)
      flags: <UP,DONE,CLONING,CONNECTED>
";
        assert_eq!(
            parse_bsd_route_get(openbsd_lan),
            Some(Route {
                interface: "em0".into(),
                gateway: None,
            })
        );
        let v6 = "   route to: 2001:db8::1\n    gateway: fe80::1%en0\n  interface: en0\n";
        assert_eq!(
            parse_bsd_route_get(v6).unwrap().gateway,
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(
            parse_bsd_route_get("route: writing to routing socket: not in table\n"),
            None
        );
    }

    #[test]
    fn gateway_macs_are_read_from_arp() {
        let gateway: IpAddr = "192.168.1.1".parse().unwrap();
        let macos = "? (192.168.1.1) at a4:2b:b0:1:2:3 on en0 ifscope [ethernet]\n";
        assert_eq!(
            parse_bsd_arp(macos, gateway).as_deref(),
            Some("a4:2b:b0:01:02:03")
        );
        let openbsd =
            "Host                                 Ethernet Address   Netif Expire    Flags
192.168.1.1                          00:11:22:AA:BB:CC    em0 19m59s
";
        assert_eq!(
            parse_bsd_arp(openbsd, gateway).as_deref(),
            Some("00:11:22:aa:bb:cc")
        );
        let incomplete = "? (192.168.1.1) at (incomplete) on en0 ifscope [ethernet]\n";
        assert_eq!(parse_bsd_arp(incomplete, gateway), None);
        // Another host's entry is not the gateway's.
        let other = "? (192.168.1.10) at a4:2b:b0:1:2:3 on en0 ifscope [ethernet]\n";
        assert_eq!(parse_bsd_arp(other, gateway), None);
    }
}

/// Calls `changed` whenever the kernel reports a change of links, addresses,
/// routes or neighbours (Linux: a netlink socket subscribed to those groups);
/// elsewhere never (the daemon's periodic look covers it). The call comes from
/// a thread of its own; a burst of events may call it several times.
///
/// # Errors
/// The netlink socket cannot be opened (the caller falls back to polling).
pub fn watch(changed: impl Fn() + Send + 'static) -> std::io::Result<()> {
    platform_watch::watch(changed)
}

#[cfg(target_os = "linux")]
mod platform_watch {
    use netlink_sys::protocols::NETLINK_ROUTE;
    use netlink_sys::{Socket, SocketAddr};

    // Multicast groups of <linux/rtnetlink.h>.
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_NEIGH: u32 = 0x4;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV4_ROUTE: u32 = 0x40;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    const RTMGRP_IPV6_ROUTE: u32 = 0x400;

    pub(super) fn watch(changed: impl Fn() + Send + 'static) -> std::io::Result<()> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = RTMGRP_LINK
            | RTMGRP_NEIGH
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV6_ROUTE;
        socket.bind(&SocketAddr::new(0, groups))?;
        std::thread::Builder::new()
            .name("netlink".into())
            .spawn(move || {
                let mut buffer = vec![0_u8; 64 * 1024];
                let mut filter = super::events::Filter::default();
                loop {
                    match socket.recv(&mut &mut buffer[..], 0) {
                        // What changed is read from the tables again; a neighbour
                        // refresh changes nothing there.
                        Ok(read) => {
                            if filter.worth_a_look(&buffer[..read.min(buffer.len())]) {
                                changed();
                            }
                        }
                        // ENOBUFS: events were lost; look anyway.
                        Err(error)
                            if error.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) =>
                        {
                            changed();
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(error) => {
                            tracing::error!(%error, "the netlink watcher stopped");
                            return;
                        }
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod platform_watch {
    pub(super) fn watch(_changed: impl Fn() + Send + 'static) -> std::io::Result<()> {
        Ok(())
    }
}
