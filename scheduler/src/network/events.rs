//! Which kernel events about the network are worth a look at the link, and the
//! neighbour table's answer for one address (an IPv6 gateway's MAC).
//!
//! Every link, address and route change is. Of the neighbour table, only a
//! neighbour whose hardware address is new or changed is (the gateway's MAC is
//! part of what policies match, and a network whose gateway has the same IP
//! address as the last one shows itself there): the kernel also reports every
//! reachability refresh of every neighbour, every few seconds each on a busy LAN,
//! and each used to cost the daemon a look (routes, ARP, NetworkManager, a name
//! lookup).

use std::collections::HashMap;

/// Netlink speaks in the host's byte order: every integer of its messages is
/// read with this.
#[expect(
    clippy::host_endian_bytes,
    reason = "netlink messages are in host byte order"
)]
fn host_u16(bytes: [u8; 2]) -> u16 {
    u16::from_ne_bytes(bytes)
}

#[expect(
    clippy::host_endian_bytes,
    reason = "netlink messages are in host byte order"
)]
fn host_u32(bytes: [u8; 4]) -> u32 {
    u32::from_ne_bytes(bytes)
}

/// `nlmsghdr.nlmsg_type` values of `<linux/netlink.h>` and `<linux/rtnetlink.h>`.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
/// `nlmsghdr.nlmsg_flags`: a request, for the whole table.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// Attributes of a neighbour message: its address and its hardware address.
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// The attribute type's bits (the top two are flags).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
/// `struct ndmsg`: family, padding, interface index, state, flags, type.
const NDMSG_LEN: usize = 12;
/// Neighbours remembered at most; past that the memory starts afresh (the next
/// report of each is a look once more).
const MAX_NEIGHBOURS: usize = 4096;

/// The hardware address last reported of each neighbour (interface, address).
#[derive(Debug, Default)]
pub(super) struct Filter {
    neighbours: HashMap<(u32, Vec<u8>), Vec<u8>>,
}

impl Filter {
    /// Whether the messages in `buffer`, as one read of the netlink socket
    /// returned them, call for a look. Anything it cannot read does.
    pub(super) fn worth_a_look(&mut self, buffer: &[u8]) -> bool {
        let mut rest = buffer;
        let mut worth = false;
        while !rest.is_empty() {
            let Some((len, kind)) = header(rest) else {
                return true;
            };
            let body = &rest[NLMSG_HDRLEN..len];
            worth |= match kind {
                RTM_NEWNEIGH => self.neighbour(body),
                // The kernel forgets neighbours it has not talked to in a while;
                // one it talks to again is reported anew.
                RTM_DELNEIGH => false,
                _ => true,
            };
            rest = &rest[aligned(len).min(rest.len())..];
        }
        worth
    }

    /// A neighbour's report: a look when its hardware address is new or changed,
    /// or it lost the one it had.
    fn neighbour(&mut self, body: &[u8]) -> bool {
        let Some(Neighbour {
            ifindex,
            address: Some(address),
            hardware,
        }) = Neighbour::read(body)
        else {
            return true;
        };
        let key = (ifindex, address.to_vec());
        match hardware {
            Some(hardware) => {
                if self.neighbours.len() >= MAX_NEIGHBOURS && !self.neighbours.contains_key(&key) {
                    self.neighbours.clear();
                }
                self.neighbours
                    .insert(key, hardware.to_vec())
                    .is_none_or(|old| old != hardware)
            }
            // Incomplete or failed: a look only if it had an address before.
            None => self.neighbours.remove(&key).is_some(),
        }
    }
}

/// What a neighbour message says.
struct Neighbour<'a> {
    ifindex: u32,
    /// Its IP address.
    address: Option<&'a [u8]>,
    /// Its hardware address; none while it is being resolved or has failed.
    hardware: Option<&'a [u8]>,
}

impl<'a> Neighbour<'a> {
    /// Reads the body of a neighbour message; `None` if it is malformed.
    fn read(body: &'a [u8]) -> Option<Self> {
        if body.len() < NDMSG_LEN {
            return None;
        }
        let ifindex = host_u32([body[4], body[5], body[6], body[7]]);
        let mut attributes = &body[NDMSG_LEN..];
        let (mut address, mut hardware) = (None, None);
        while attributes.len() >= 4 {
            let len = usize::from(host_u16([attributes[0], attributes[1]]));
            let kind = host_u16([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
            if len < 4 || len > attributes.len() {
                return None;
            }
            let data = &attributes[4..len];
            match kind {
                NDA_DST => address = Some(data),
                NDA_LLADDR => hardware = Some(data),
                _ => {}
            }
            attributes = &attributes[aligned(len).min(attributes.len())..];
        }
        Some(Self {
            ifindex,
            address,
            hardware,
        })
    }
}

/// A request for the kernel's whole neighbour table of one address family
/// (`AF_INET6`: 10).
pub(super) fn neighbour_dump_request(family: u8) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NDMSG_LEN;
    let mut request = Vec::with_capacity(len);
    request.extend_from_slice(&host_u32_bytes(u32::try_from(len).expect("28 bytes")));
    request.extend_from_slice(&host_u16_bytes(RTM_GETNEIGH));
    request.extend_from_slice(&host_u16_bytes(NLM_F_REQUEST | NLM_F_DUMP));
    request.extend_from_slice(&host_u32_bytes(1)); // sequence
    request.extend_from_slice(&host_u32_bytes(0)); // port: the kernel's
    request.push(family);
    request.resize(len, 0);
    request
}

/// What one read of a neighbour dump says about one neighbour.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    /// Its hardware address, as `aa:bb:cc:dd:ee:ff`.
    Found(String),
    /// The dump ended (or failed) without it, or with it unresolved.
    NotThere,
    /// Not in this part of the dump: read on.
    ReadOn,
}

/// Looks for `address` on interface `ifindex` in `buffer`, one read of the
/// answer to [`neighbour_dump_request`].
pub(super) fn find_neighbour(buffer: &[u8], ifindex: u32, address: &[u8]) -> Lookup {
    let mut rest = buffer;
    while !rest.is_empty() {
        let Some((len, kind)) = header(rest) else {
            return Lookup::NotThere;
        };
        match kind {
            NLMSG_DONE | NLMSG_ERROR => return Lookup::NotThere,
            RTM_NEWNEIGH => {
                if let Some(neighbour) = Neighbour::read(&rest[NLMSG_HDRLEN..len])
                    && neighbour.ifindex == ifindex
                    && neighbour.address == Some(address)
                {
                    return match neighbour.hardware {
                        Some(hardware) if hardware.iter().any(|&b| b != 0) => {
                            Lookup::Found(super::mac_string(hardware))
                        }
                        _ => Lookup::NotThere,
                    };
                }
            }
            _ => {}
        }
        rest = &rest[aligned(len).min(rest.len())..];
    }
    Lookup::ReadOn
}

#[expect(
    clippy::host_endian_bytes,
    reason = "netlink messages are in host byte order"
)]
fn host_u16_bytes(value: u16) -> [u8; 2] {
    value.to_ne_bytes()
}

#[expect(
    clippy::host_endian_bytes,
    reason = "netlink messages are in host byte order"
)]
fn host_u32_bytes(value: u32) -> [u8; 4] {
    value.to_ne_bytes()
}

/// The length and type of the message at the start of `bytes`, if it is whole.
fn header(bytes: &[u8]) -> Option<(usize, u16)> {
    if bytes.len() < NLMSG_HDRLEN {
        return None;
    }
    let len = host_u32([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let kind = host_u16([bytes[4], bytes[5]]);
    (NLMSG_HDRLEN..=bytes.len())
        .contains(&len)
        .then_some((len, kind))
}

/// Netlink messages and attributes start at multiples of four.
fn aligned(len: usize) -> usize {
    len.saturating_add(3) & !3
}

#[cfg(test)]
#[expect(
    clippy::host_endian_bytes,
    reason = "the tests write netlink messages, which are in host byte order"
)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn attribute(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(aligned(out.len()), 0);
        out
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(body);
        out.resize(aligned(out.len()), 0);
        out
    }

    /// A neighbour report as the kernel sends it: `ndmsg`, then its attributes.
    fn neighbour(ifindex: i32, state: u16, address: &[u8], hardware: Option<[u8; 6]>) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 0];
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend(attribute(NDA_DST, address));
        if let Some(hardware) = hardware {
            body.extend(attribute(NDA_LLADDR, &hardware));
        }
        // Cache information, as the kernel adds: not looked at.
        body.extend(attribute(3, &[0; 16]));
        message(RTM_NEWNEIGH, &body)
    }

    const REACHABLE: u16 = 0x02;
    const STALE: u16 = 0x04;
    const FAILED: u16 = 0x20;
    const GATEWAY: [u8; 4] = [192, 168, 1, 1];
    const HOME: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const CAFE: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    #[test]
    fn neighbour_refreshes_are_not_worth_a_look_but_a_new_hardware_address_is() {
        let mut filter = Filter::default();
        assert!(filter.worth_a_look(&neighbour(3, REACHABLE, &GATEWAY, Some(HOME))));
        // The reachability cycle of the same neighbour: nothing new.
        for state in [STALE, REACHABLE, STALE] {
            assert!(!filter.worth_a_look(&neighbour(3, state, &GATEWAY, Some(HOME))));
        }
        // Another network with a gateway at the same address.
        assert!(filter.worth_a_look(&neighbour(3, REACHABLE, &GATEWAY, Some(CAFE))));
        // The same address on another interface is another neighbour.
        assert!(filter.worth_a_look(&neighbour(4, REACHABLE, &GATEWAY, Some(CAFE))));
        // Gone unreachable: it had an address, so a look; then nothing more.
        assert!(filter.worth_a_look(&neighbour(3, FAILED, &GATEWAY, None)));
        assert!(!filter.worth_a_look(&neighbour(3, FAILED, &GATEWAY, None)));
        // Forgotten by the kernel: not a look.
        assert!(!filter.worth_a_look(&message(RTM_DELNEIGH, &[0; 12])));
    }

    #[test]
    fn a_neighbour_dump_gives_the_hardware_address_of_the_one_asked_for() {
        const GATEWAY6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99];
        let request = neighbour_dump_request(10);
        assert_eq!(header(&request), Some((28, RTM_GETNEIGH)));
        assert_eq!(request[16], 10);
        // The same address on another interface, another address, then it.
        let mut dump = neighbour(4, REACHABLE, &GATEWAY6, Some(CAFE));
        dump.extend(neighbour(3, REACHABLE, &GATEWAY, Some(CAFE)));
        assert_eq!(find_neighbour(&dump, 3, &GATEWAY6), Lookup::ReadOn);
        dump.extend(neighbour(3, STALE, &GATEWAY6, Some(HOME)));
        assert_eq!(
            find_neighbour(&dump, 3, &GATEWAY6),
            Lookup::Found("02:00:00:00:00:01".into())
        );
        // Unresolved, or the end of the dump without it: not there.
        assert_eq!(
            find_neighbour(&neighbour(3, FAILED, &GATEWAY6, None), 3, &GATEWAY6),
            Lookup::NotThere
        );
        let mut ended = neighbour(4, REACHABLE, &GATEWAY6, Some(CAFE));
        ended.extend(message(NLMSG_DONE, &[0; 4]));
        assert_eq!(find_neighbour(&ended, 3, &GATEWAY6), Lookup::NotThere);
        assert_eq!(find_neighbour(&[1, 2, 3], 3, &GATEWAY6), Lookup::NotThere);
    }

    #[test]
    fn links_addresses_routes_and_anything_unreadable_are_worth_a_look() {
        let mut filter = Filter::default();
        for kind in [16, 20, 24] {
            // RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE
            assert!(filter.worth_a_look(&message(kind, &[0; 20])));
        }
        // A refresh and a route change read at once: the route counts.
        filter.worth_a_look(&neighbour(3, REACHABLE, &GATEWAY, Some(HOME)));
        let mut both = neighbour(3, STALE, &GATEWAY, Some(HOME));
        both.extend(message(24, &[0; 20]));
        assert!(filter.worth_a_look(&both));
        let mut refreshes = neighbour(3, STALE, &GATEWAY, Some(HOME));
        refreshes.extend(neighbour(3, REACHABLE, &GATEWAY, Some(HOME)));
        assert!(!filter.worth_a_look(&refreshes));
        // Cut short, or claiming more than is there.
        let whole = neighbour(3, STALE, &GATEWAY, Some(CAFE));
        assert!(filter.worth_a_look(&whole[..whole.len() - 9]));
        assert!(filter.worth_a_look(&[0xff; 20]));
    }

    proptest! {
        #[test]
        fn any_bytes_are_read_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut filter = Filter::default();
            filter.worth_a_look(&bytes);
            prop_assert!(filter.neighbours.len() <= MAX_NEIGHBOURS);
            find_neighbour(&bytes, 3, &[0xfe, 0x80, 0, 0]);
        }
    }
}
