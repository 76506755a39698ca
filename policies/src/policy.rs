//! One network's policy, read from a TOML file: what matches it, how much may be
//! spent in which period, at which rate, by which priority classes. Every key is
//! documented in `policies/README.md`.

use std::net::IpAddr;
use std::path::Path;

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::PolicyError;
use crate::size::parse_size;

/// A priority class of a backup set (the client's configuration names it too).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Goes first, and over thin links.
    Critical,
    /// The default.
    #[default]
    Normal,
    /// Only over generous links.
    Bulk,
}

impl Class {
    /// All classes, most urgent first.
    pub const ALL: [Self; 3] = [Self::Critical, Self::Normal, Self::Bulk];

    /// Its number, 0 the most urgent (the client's spool stores it).
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// What kind of interface a link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// Wired Ethernet.
    Ethernet,
    /// Wi-Fi.
    Wifi,
    /// A mobile broadband modem.
    Wwan,
    /// A point-to-point link (dial-up, some satellite modems).
    Ppp,
    /// A tunnel (VPN).
    Tun,
    /// A radio link (AX.25 and the like).
    Radio,
}

/// The budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodKind {
    /// A calendar day in the policy's time zone.
    Day,
    /// A calendar week from Monday.
    Week,
    /// A billing month from `billing_day`.
    Month,
    /// The last `rolling_hours` hours.
    Rolling,
}

/// A daily window of local time, `start` inclusive, `end` exclusive, in minutes
/// after midnight; a window whose end is before its start wraps past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight it starts.
    pub start: u16,
    /// Minutes after midnight it ends.
    pub end: u16,
}

impl Window {
    /// Whether `minute` (after midnight) falls in the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start <= self.end {
            self.start <= minute && minute < self.end
        } else {
            minute >= self.start || minute < self.end
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| format!("`{text}` is not a window like `07:00-23:00`"))?;
        let minute = |t: &str| -> Result<u16, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("`{t}` is not a time like `07:00`"))?;
            let h: u16 = h.parse().map_err(|_| format!("`{t}`: bad hour"))?;
            let m: u16 = m.parse().map_err(|_| format!("`{t}`: bad minute"))?;
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(format!("`{t}` is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let window = Self {
            start: minute(start)?,
            end: minute(end)?,
        };
        if window.start == window.end {
            return Err(format!("`{text}` is empty"));
        }
        Ok(window)
    }
}

/// An address prefix, like `172.20.10.0/28`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The network address.
    pub address: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Prefix {
    /// Whether `address` is in the prefix.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Parses `ADDRESS/LEN`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (address, len) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a prefix like `192.168.1.0/24`"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("`{len}` is not a length"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("a prefix of {address} is at most {max} bits"));
        }
        Ok(Self { address, len })
    }
}

/// What identifies the network a policy is for; every key given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Interface name, with `*` and `?` wildcards.
    pub interface: Option<String>,
    /// Interface kind.
    pub kind: Option<LinkKind>,
    /// Wi-Fi network name.
    pub ssid: Option<String>,
    /// Wi-Fi access point (lower-case `aa:bb:cc:dd:ee:ff`).
    pub bssid: Option<String>,
    /// The gateway's MAC address (lower-case).
    pub gateway_mac: Option<String>,
    /// An address of the interface lies in this prefix.
    pub prefix: Option<Prefix>,
    /// NetworkManager's metered flag.
    pub metered: Option<bool>,
    /// Whether the link looks like a phone's hotspot.
    pub hotspot: Option<bool>,
}

/// How much may be spent, and when it counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// The cap, in bytes on the link (both directions, overhead included).
    pub bytes: u64,
    /// The period the cap is for.
    pub period: PeriodKind,
    /// The day of the month a billing month starts (1-31; a shorter month starts
    /// on its last day).
    pub billing_day: u8,
    /// Hours of a rolling window.
    pub rolling_hours: u32,
    /// The time zone of days, weeks, months and windows.
    pub time_zone: TimeZone,
    /// Only traffic in this window counts (outside it is free).
    pub counted: Option<Window>,
    /// Traffic in these windows does not count.
    pub free: Vec<Window>,
    /// Share of the cap the ledger lets itself spend, so that what the kernel or
    /// the provider counts (headers, retransmissions) stays inside the cap.
    pub safety: f64,
}

/// How fast bytes may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    /// Bytes per second outside the windows.
    pub bytes_per_second: Option<u64>,
    /// Other rates in some hours.
    pub windows: Vec<(Window, u64)>,
}

/// The link's physical facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The classes that may use it.
    pub classes: Vec<Class>,
    /// Its raw speed in bits per second, if known (a cap on the rate).
    pub bits_per_second: Option<u64>,
    /// Payload bytes per packet of the link's framing.
    pub packet_payload: u32,
    /// Header bytes per packet the ledger adds (the metered stream sees payload).
    pub packet_overhead: u32,
    /// An amateur-radio link: nothing encrypted may go over it.
    pub amateur: bool,
    /// Do not upload while on battery.
    pub defer_on_battery: bool,
}

impl Link {
    /// Bytes on the link for `payload` bytes the connection writes or reads.
    pub fn on_the_wire(&self, payload: u64) -> u64 {
        let per = u64::from(self.packet_payload.max(1));
        payload + payload.div_ceil(per) * u64::from(self.packet_overhead)
    }

    /// The most payload bytes whose wire bytes fit in `wire` (the inverse).
    pub fn payload_within(&self, wire: u64) -> u64 {
        let per = u64::from(self.packet_payload.max(1));
        let full = per + u64::from(self.packet_overhead);
        let packets = wire / full;
        let rest = wire % full;
        packets * per + rest.saturating_sub(u64::from(self.packet_overhead))
    }
}

/// One network's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Its name (the file's stem unless `name` says otherwise).
    pub name: String,
    /// Whether it is the policy of networks nothing else matches.
    pub default: bool,
    /// What it matches.
    pub matching: Match,
    /// Its budget, if it has one (none: unlimited).
    pub budget: Option<Budget>,
    /// Its rate.
    pub rate: Rate,
    /// The link.
    pub link: Link,
}

/// TCP over IPv4 with timestamps: 1448 payload bytes per packet, 52 header bytes.
pub const TCP_PAYLOAD: u32 = 1448;
/// See [`TCP_PAYLOAD`].
pub const TCP_OVERHEAD: u32 = 52;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<String>,
    #[serde(default)]
    default: bool,
    #[serde(rename = "match", default)]
    matching: RawMatch,
    budget: Option<RawBudget>,
    rate: Option<RawRate>,
    #[serde(default)]
    link: RawLink,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    interface: Option<String>,
    kind: Option<LinkKind>,
    ssid: Option<String>,
    bssid: Option<Spanned<String>>,
    gateway_mac: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    metered: Option<bool>,
    hotspot: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    bytes: Spanned<String>,
    period: PeriodKind,
    billing_day: Option<Spanned<u8>>,
    rolling_hours: Option<Spanned<u32>>,
    time_zone: Option<Spanned<String>>,
    counted_hours: Option<Spanned<String>>,
    #[serde(default)]
    free_hours: Vec<Spanned<String>>,
    safety: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    bytes_per_second: Option<Spanned<String>>,
    #[serde(default)]
    windows: Vec<RawRateWindow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateWindow {
    hours: Spanned<String>,
    bytes_per_second: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLink {
    classes: Option<Vec<Class>>,
    bits_per_second: Option<u64>,
    packet_payload: Option<Spanned<u32>>,
    packet_overhead: Option<u32>,
    #[serde(default)]
    amateur: bool,
    #[serde(default)]
    defer_on_battery: bool,
}

impl Policy {
    /// Parses a policy file's text; `path` names it in errors and gives the
    /// default name (its stem).
    ///
    /// # Errors
    /// [`PolicyError`] with the file, line and column, what was expected and what
    /// was found.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let at = |span: std::ops::Range<usize>, message: String| {
            PolicyError::at(path, text, span.start, message)
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|error| {
            let start = error.span().map_or(0, |s| s.start);
            PolicyError::at(path, text, start, error.message().trim_end().to_string())
        })?;
        let name = raw.name.unwrap_or_else(|| {
            path.file_stem()
                .map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned())
        });
        let mac = |value: Option<Spanned<String>>| -> Result<Option<String>, PolicyError> {
            value
                .map(|v| {
                    let text = v.get_ref().to_ascii_lowercase();
                    let parts: Vec<&str> = text.split(':').collect();
                    let ok = parts.len() == 6
                        && parts
                            .iter()
                            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
                    if ok {
                        Ok(text)
                    } else {
                        Err(at(
                            v.span(),
                            format!(
                                "expected a MAC address like `aa:bb:cc:dd:ee:ff`, found `{}`",
                                v.get_ref()
                            ),
                        ))
                    }
                })
                .transpose()
        };
        let matching = Match {
            interface: raw.matching.interface,
            kind: raw.matching.kind,
            ssid: raw.matching.ssid,
            bssid: mac(raw.matching.bssid)?,
            gateway_mac: mac(raw.matching.gateway_mac)?,
            prefix: raw
                .matching
                .prefix
                .map(|p| Prefix::parse(p.get_ref()).map_err(|m| at(p.span(), m)))
                .transpose()?,
            metered: raw.matching.metered,
            hotspot: raw.matching.hotspot,
        };
        if raw.default && matching != Match::default() {
            return Err(PolicyError::at(
                path,
                text,
                0,
                "the default policy matches every unknown network: it takes no [match] keys".into(),
            ));
        }
        let budget = raw
            .budget
            .map(|b| -> Result<Budget, PolicyError> {
                let bytes = parse_size(b.bytes.get_ref()).map_err(|m| at(b.bytes.span(), m))?;
                let billing_day = match &b.billing_day {
                    Some(day) if !(1..=31).contains(day.get_ref()) => {
                        return Err(at(
                            day.span(),
                            format!(
                                "expected a billing day from 1 to 31, found {}",
                                day.get_ref()
                            ),
                        ));
                    }
                    Some(day) => *day.get_ref(),
                    None => 1,
                };
                if b.period != PeriodKind::Month && b.billing_day.is_some() {
                    return Err(at(
                        b.billing_day.as_ref().map_or(0..0, Spanned::span),
                        "billing_day is for period = \"month\"".into(),
                    ));
                }
                let rolling_hours = match (&b.rolling_hours, b.period) {
                    (Some(h), PeriodKind::Rolling) if (1..=24 * 366).contains(h.get_ref()) => {
                        *h.get_ref()
                    }
                    (Some(h), PeriodKind::Rolling) => {
                        return Err(at(h.span(), "expected rolling_hours from 1 to 8784".into()));
                    }
                    (None, PeriodKind::Rolling) => 24,
                    (Some(h), _) => {
                        return Err(at(
                            h.span(),
                            "rolling_hours is for period = \"rolling\"".into(),
                        ));
                    }
                    (None, _) => 0,
                };
                let time_zone = match &b.time_zone {
                    Some(zone) => TimeZone::get(zone.get_ref()).map_err(|_| {
                        at(
                            zone.span(),
                            format!(
                                "expected a time zone like `Europe/Berlin`, found `{}`",
                                zone.get_ref()
                            ),
                        )
                    })?,
                    None => TimeZone::UTC,
                };
                let counted = b
                    .counted_hours
                    .as_ref()
                    .map(|w| Window::parse(w.get_ref()).map_err(|m| at(w.span(), m)))
                    .transpose()?;
                let free = b
                    .free_hours
                    .iter()
                    .map(|w| Window::parse(w.get_ref()).map_err(|m| at(w.span(), m)))
                    .collect::<Result<Vec<_>, _>>()?;
                let safety = match &b.safety {
                    Some(s) if *s.get_ref() > 0.0 && *s.get_ref() <= 1.0 => *s.get_ref(),
                    Some(s) => {
                        return Err(at(
                            s.span(),
                            format!(
                                "expected a safety factor above 0 and at most 1, found {}",
                                s.get_ref()
                            ),
                        ));
                    }
                    None => 0.95,
                };
                Ok(Budget {
                    bytes,
                    period: b.period,
                    billing_day,
                    rolling_hours,
                    time_zone,
                    counted,
                    free,
                    safety,
                })
            })
            .transpose()?;
        let rate = match raw.rate {
            None => Rate {
                bytes_per_second: None,
                windows: Vec::new(),
            },
            Some(r) => Rate {
                bytes_per_second: r
                    .bytes_per_second
                    .map(|v| parse_size(v.get_ref()).map_err(|m| at(v.span(), m)))
                    .transpose()?,
                windows: r
                    .windows
                    .iter()
                    .map(|w| {
                        Ok((
                            Window::parse(w.hours.get_ref()).map_err(|m| at(w.hours.span(), m))?,
                            parse_size(w.bytes_per_second.get_ref())
                                .map_err(|m| at(w.bytes_per_second.span(), m))?,
                        ))
                    })
                    .collect::<Result<Vec<_>, PolicyError>>()?,
            },
        };
        let packet_payload = match &raw.link.packet_payload {
            Some(p) if *p.get_ref() == 0 => {
                return Err(at(p.span(), "expected packet_payload above 0".into()));
            }
            Some(p) => *p.get_ref(),
            None => TCP_PAYLOAD,
        };
        let link = Link {
            classes: raw.link.classes.unwrap_or_else(|| Class::ALL.to_vec()),
            bits_per_second: raw.link.bits_per_second,
            packet_payload,
            packet_overhead: raw.link.packet_overhead.unwrap_or(TCP_OVERHEAD),
            amateur: raw.link.amateur,
            defer_on_battery: raw.link.defer_on_battery,
        };
        Ok(Self {
            name,
            default: raw.default,
            matching,
            budget,
            rate,
            link,
        })
    }

    /// The built-in policy of unknown networks when no file says `default = true`:
    /// cautious, 20 MB a day, critical sets only.
    pub fn cautious_default() -> Self {
        Self {
            name: "built-in default".into(),
            default: true,
            matching: Match::default(),
            budget: Some(Budget {
                bytes: 20_000_000,
                period: PeriodKind::Day,
                billing_day: 1,
                rolling_hours: 0,
                time_zone: TimeZone::UTC,
                counted: None,
                free: Vec::new(),
                safety: 0.95,
            }),
            rate: Rate {
                bytes_per_second: Some(250_000),
                windows: Vec::new(),
            },
            link: Link {
                classes: vec![Class::Critical],
                bits_per_second: None,
                packet_payload: TCP_PAYLOAD,
                packet_overhead: TCP_OVERHEAD,
                amateur: false,
                defer_on_battery: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("net/hotspot.toml"))
    }

    #[test]
    fn a_full_policy_parses() {
        let policy = parse(
            r#"
[match]
ssid = "Pixel"
hotspot = true

[budget]
bytes = "2 GB"
period = "month"
billing_day = 17
time_zone = "Europe/Berlin"
free_hours = ["01:00-06:00"]

[rate]
bytes_per_second = "1 MB"
windows = [{ hours = "18:00-23:00", bytes_per_second = "200 kB" }]

[link]
classes = ["critical", "normal"]
defer_on_battery = true
"#,
        )
        .unwrap();
        assert_eq!(policy.name, "hotspot");
        let budget = policy.budget.unwrap();
        assert_eq!(budget.bytes, 2_000_000_000);
        assert_eq!(budget.billing_day, 17);
        assert_eq!(
            budget.free,
            vec![Window {
                start: 60,
                end: 360
            }]
        );
        assert_eq!(policy.rate.windows[0].1, 200_000);
        assert_eq!(policy.link.classes, vec![Class::Critical, Class::Normal]);
    }

    #[test]
    fn errors_say_where_what_was_expected_and_what_was_found() {
        let cases = [
            (
                "[budget]\nbytes = \"2 XB\"\nperiod = \"day\"\n",
                2,
                "unknown unit",
            ),
            (
                "[budget]\nbytes = \"2 GB\"\nperiod = \"fortnight\"\n",
                3,
                "fortnight",
            ),
            ("[match]\ncolour = \"red\"\n", 2, "colour"),
            (
                "[budget]\nbytes = \"1 GB\"\nperiod = \"month\"\nbilling_day = 32\n",
                4,
                "found 32",
            ),
            ("[match]\nprefix = \"10.0.0.0/40\"\n", 2, "at most 32"),
            ("[match]\ngateway_mac = \"zz\"\n", 2, "found `zz`"),
            (
                "[budget]\nbytes = \"1 GB\"\nperiod = \"day\"\ntime_zone = \"Mars/Olympus\"\n",
                4,
                "Mars/Olympus",
            ),
            (
                "[budget]\nbytes = \"1 GB\"\nperiod = \"day\"\ncounted_hours = \"7-23\"\n",
                4,
                "07:00",
            ),
            (
                "default = true\n[match]\nssid = \"x\"\n",
                1,
                "takes no [match]",
            ),
        ];
        for (text, line, needle) in cases {
            let error = parse(text).unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("net/hotspot.toml:{line}:")),
                "{text}: {message}"
            );
            assert!(message.contains(needle), "{text}: {message}");
        }
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let night = Window::parse("22:00-06:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && night.contains(5 * 60 + 59));
        assert!(!night.contains(6 * 60) && !night.contains(12 * 60));
        assert!(Window::parse("07:00-07:00").is_err());
        assert!(Window::parse("25:00-07:00").is_err());
    }

    #[test]
    fn prefixes_contain_their_addresses() {
        let ios = Prefix::parse("172.20.10.0/28").unwrap();
        assert!(ios.contains("172.20.10.5".parse().unwrap()));
        assert!(!ios.contains("172.20.10.16".parse().unwrap()));
        let all = Prefix::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = Prefix::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn overhead_round_trips() {
        let link = Policy::cautious_default().link;
        for payload in [0_u64, 1, 1447, 1448, 1449, 1_000_000] {
            let wire = link.on_the_wire(payload);
            assert!(wire >= payload);
            assert_eq!(link.payload_within(wire), payload, "{payload}");
            if wire > 0 {
                assert!(link.on_the_wire(link.payload_within(wire - 1)) < wire);
            }
        }
    }
}
