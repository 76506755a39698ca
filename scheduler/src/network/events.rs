//! Which kernel events about the network are worth a look at the link.
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

/// `nlmsghdr.nlmsg_type` values of `<linux/rtnetlink.h>`.
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
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
        if body.len() < NDMSG_LEN {
            return true;
        }
        let ifindex = host_u32([body[4], body[5], body[6], body[7]]);
        let mut attributes = &body[NDMSG_LEN..];
        let (mut address, mut hardware) = (None, None);
        while attributes.len() >= 4 {
            let len = usize::from(host_u16([attributes[0], attributes[1]]));
            let kind = host_u16([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
            if len < 4 || len > attributes.len() {
                return true;
            }
            let data = &attributes[4..len];
            match kind {
                NDA_DST => address = Some(data),
                NDA_LLADDR => hardware = Some(data),
                _ => {}
            }
            attributes = &attributes[aligned(len).min(attributes.len())..];
        }
        let Some(address) = address else {
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
    fn neighbour(ifindex: i32, state: u16, address: [u8; 4], hardware: Option<[u8; 6]>) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 0];
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend(attribute(NDA_DST, &address));
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
        assert!(filter.worth_a_look(&neighbour(3, REACHABLE, GATEWAY, Some(HOME))));
        // The reachability cycle of the same neighbour: nothing new.
        for state in [STALE, REACHABLE, STALE] {
            assert!(!filter.worth_a_look(&neighbour(3, state, GATEWAY, Some(HOME))));
        }
        // Another network with a gateway at the same address.
        assert!(filter.worth_a_look(&neighbour(3, REACHABLE, GATEWAY, Some(CAFE))));
        // The same address on another interface is another neighbour.
        assert!(filter.worth_a_look(&neighbour(4, REACHABLE, GATEWAY, Some(CAFE))));
        // Gone unreachable: it had an address, so a look; then nothing more.
        assert!(filter.worth_a_look(&neighbour(3, FAILED, GATEWAY, None)));
        assert!(!filter.worth_a_look(&neighbour(3, FAILED, GATEWAY, None)));
        // Forgotten by the kernel: not a look.
        assert!(!filter.worth_a_look(&message(RTM_DELNEIGH, &[0; 12])));
    }

    #[test]
    fn links_addresses_routes_and_anything_unreadable_are_worth_a_look() {
        let mut filter = Filter::default();
        for kind in [16, 20, 24] {
            // RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE
            assert!(filter.worth_a_look(&message(kind, &[0; 20])));
        }
        // A refresh and a route change read at once: the route counts.
        filter.worth_a_look(&neighbour(3, REACHABLE, GATEWAY, Some(HOME)));
        let mut both = neighbour(3, STALE, GATEWAY, Some(HOME));
        both.extend(message(24, &[0; 20]));
        assert!(filter.worth_a_look(&both));
        let mut refreshes = neighbour(3, STALE, GATEWAY, Some(HOME));
        refreshes.extend(neighbour(3, REACHABLE, GATEWAY, Some(HOME)));
        assert!(!filter.worth_a_look(&refreshes));
        // Cut short, or claiming more than is there.
        let whole = neighbour(3, STALE, GATEWAY, Some(CAFE));
        assert!(filter.worth_a_look(&whole[..whole.len() - 9]));
        assert!(filter.worth_a_look(&[0xff; 20]));
    }

    proptest! {
        #[test]
        fn any_bytes_are_read_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut filter = Filter::default();
            filter.worth_a_look(&bytes);
            prop_assert!(filter.neighbours.len() <= MAX_NEIGHBOURS);
        }
    }
}
