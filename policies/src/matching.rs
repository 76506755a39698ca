//! Which policy a network gets: every key of a policy's `[match]` must hold for
//! what is observed of the link, and of the policies that match, the most
//! specific wins (an access point or a gateway's MAC says more than a network
//! name, which says more than an interface name pattern).

use std::net::IpAddr;
use std::path::Path;

use crate::error::PolicyError;
use crate::policy::{LinkKind, Match, Policy, Prefix};

/// What can be observed of the current link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Interface name (`wlan0`, `enp3s0`, `ax0`).
    pub interface: String,
    /// Interface kind, if known.
    pub kind: Option<LinkKind>,
    /// Wi-Fi network name.
    pub ssid: Option<String>,
    /// Wi-Fi access point (lower-case).
    pub bssid: Option<String>,
    /// The gateway's MAC address (lower-case).
    pub gateway_mac: Option<String>,
    /// The interface's addresses.
    pub addresses: Vec<IpAddr>,
    /// NetworkManager's metered flag, if NetworkManager runs.
    pub metered: Option<bool>,
    /// The DHCP lease carried Android's `ANDROID_METERED` vendor option.
    pub android_metered: bool,
}

impl Observation {
    /// Whether the link looks like a phone's hotspot: Android says so in its DHCP
    /// lease, iOS hands out 172.20.10.0/28, and phones' gateways use locally
    /// administered MAC addresses.
    pub fn looks_like_hotspot(&self) -> bool {
        let ios = Prefix {
            address: IpAddr::V4(std::net::Ipv4Addr::new(172, 20, 10, 0)),
            len: 28,
        };
        let local_mac = self.gateway_mac.as_deref().is_some_and(|mac| {
            u8::from_str_radix(mac.get(..2).unwrap_or("00"), 16).is_ok_and(|b| b & 0x02 != 0)
        });
        self.android_metered || self.addresses.iter().any(|a| ios.contains(*a)) || local_mac
    }
}

/// How specific a match is, or `None` when some key does not hold.
pub fn specificity(matching: &Match, seen: &Observation) -> Option<u32> {
    let mut score = 0;
    if let Some(pattern) = &matching.interface {
        if !glob(pattern, &seen.interface) {
            return None;
        }
        score += if pattern.contains(['*', '?']) { 1 } else { 2 };
    }
    if let Some(kind) = matching.kind {
        if seen.kind != Some(kind) {
            return None;
        }
        score += 1;
    }
    if let Some(ssid) = &matching.ssid {
        if seen.ssid.as_ref() != Some(ssid) {
            return None;
        }
        score += 4;
    }
    if let Some(bssid) = &matching.bssid {
        if seen.bssid.as_ref() != Some(bssid) {
            return None;
        }
        score += 8;
    }
    if let Some(mac) = &matching.gateway_mac {
        if seen.gateway_mac.as_ref() != Some(mac) {
            return None;
        }
        score += 8;
    }
    if let Some(prefix) = &matching.prefix {
        if !seen.addresses.iter().any(|a| prefix.contains(*a)) {
            return None;
        }
        score += 2;
    }
    if let Some(metered) = matching.metered {
        if seen.metered != Some(metered) {
            return None;
        }
        score += 1;
    }
    if let Some(hotspot) = matching.hotspot {
        if seen.looks_like_hotspot() != hotspot {
            return None;
        }
        score += 1;
    }
    Some(score)
}

/// `*` any run, `?` any one character, everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Classic two-pointer wildcard match with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// The policies of a policy directory, checked together.
#[derive(Debug, Clone)]
pub struct PolicySet {
    policies: Vec<Policy>,
    default: Policy,
}

/// Which policy applies, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection<'a> {
    /// The policy.
    pub policy: &'a Policy,
    /// Why, for `homing policy explain`.
    pub reason: String,
}

impl PolicySet {
    /// Parses policy files (path and text each) and checks them together: two
    /// defaults, or two policies with the same `[match]`, are errors.
    ///
    /// # Errors
    /// Every error found, each naming its file (and line and column).
    pub fn load<'a>(
        files: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Self, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut policies: Vec<(String, Policy)> = Vec::new();
        for (path, text) in files {
            match Policy::parse(text, path) {
                Ok(policy) => policies.push((path.display().to_string(), policy)),
                Err(error) => errors.push(error),
            }
        }
        let mut default: Option<(String, Policy)> = None;
        let mut specific: Vec<(String, Policy)> = Vec::new();
        for (file, policy) in policies {
            if policy.default {
                if let Some((first, _)) = &default {
                    errors.push(PolicyError::TwoDefaults {
                        first: first.clone(),
                        second: file,
                    });
                    continue;
                }
                default = Some((file, policy));
            } else {
                if let Some((first, _)) =
                    specific.iter().find(|(_, p)| p.matching == policy.matching)
                {
                    errors.push(PolicyError::Ambiguous {
                        first: first.clone(),
                        second: file,
                    });
                    continue;
                }
                specific.push((file, policy));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            policies: specific.into_iter().map(|(_, p)| p).collect(),
            default: default.map_or_else(Policy::cautious_default, |(_, p)| p),
        })
    }

    /// The policy for what is seen of the link.
    ///
    /// # Errors
    /// [`PolicyError::Ambiguous`] when two policies match equally well.
    pub fn select(&self, seen: &Observation) -> Result<Selection<'_>, PolicyError> {
        let mut best: Option<(u32, &Policy)> = None;
        let mut tie: Option<&Policy> = None;
        for policy in &self.policies {
            let Some(score) = specificity(&policy.matching, seen) else {
                continue;
            };
            match best {
                Some((top, _)) if score < top => {}
                Some((top, _)) if score == top => tie = Some(policy),
                _ => {
                    best = Some((score, policy));
                    tie = None;
                }
            }
        }
        match (best, tie) {
            (Some((_, first)), Some(second)) => Err(PolicyError::Ambiguous {
                first: first.name.clone(),
                second: second.name.clone(),
            }),
            (Some((score, policy)), None) => Ok(Selection {
                policy,
                reason: format!(
                    "policy `{}` matches {} (specificity {score})",
                    policy.name,
                    describe(seen)
                ),
            }),
            (None, _) => Ok(Selection {
                policy: &self.default,
                reason: format!(
                    "no policy matches {}: the default `{}` applies",
                    describe(seen),
                    self.default.name
                ),
            }),
        }
    }

    /// The policies, the default last.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter().chain(std::iter::once(&self.default))
    }
}

fn describe(seen: &Observation) -> String {
    let mut parts = vec![format!("interface {}", seen.interface)];
    if let Some(ssid) = &seen.ssid {
        parts.push(format!("SSID {ssid:?}"));
    }
    if let Some(mac) = &seen.gateway_mac {
        parts.push(format!("gateway {mac}"));
    }
    if seen.metered == Some(true) {
        parts.push("metered".into());
    }
    if seen.looks_like_hotspot() {
        parts.push("a hotspot".into());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<PolicySet, Vec<PolicyError>> {
        PolicySet::load(files.iter().map(|(p, t)| (Path::new(*p), *t)))
    }

    fn wifi(ssid: &str) -> Observation {
        Observation {
            interface: "wlan0".into(),
            kind: Some(LinkKind::Wifi),
            ssid: Some(ssid.into()),
            ..Observation::default()
        }
    }

    #[test]
    fn the_most_specific_match_wins_and_unknown_networks_get_the_default() {
        let set = load(&[
            ("home.toml", "[match]\nssid = \"Home\"\n"),
            ("any-wifi.toml", "[match]\nkind = \"wifi\"\n"),
            (
                "home-ap.toml",
                "[match]\nssid = \"Home\"\nbssid = \"aa:bb:cc:dd:ee:ff\"\n",
            ),
            ("unknown.toml", "default = true\n"),
        ])
        .unwrap();
        assert_eq!(set.select(&wifi("Home")).unwrap().policy.name, "home");
        let mut at_the_ap = wifi("Home");
        at_the_ap.bssid = Some("aa:bb:cc:dd:ee:ff".into());
        assert_eq!(set.select(&at_the_ap).unwrap().policy.name, "home-ap");
        assert_eq!(set.select(&wifi("Cafe")).unwrap().policy.name, "any-wifi");
        let wired = Observation {
            interface: "eth0".into(),
            ..Observation::default()
        };
        let selection = set.select(&wired).unwrap();
        assert_eq!(selection.policy.name, "unknown");
        assert!(selection.reason.contains("no policy matches"));
    }

    #[test]
    fn equal_matches_are_errors_at_load_or_at_selection() {
        let errors = load(&[
            ("a.toml", "[match]\nssid = \"X\"\n"),
            ("b.toml", "[match]\nssid = \"X\"\n"),
            ("c.toml", "default = true\n"),
            ("d.toml", "default = true\n"),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let set = load(&[
            ("a.toml", "[match]\nssid = \"X\"\n"),
            (
                "b.toml",
                "[match]\ninterface = \"wlan0\"\nkind = \"wifi\"\nmetered = false\n",
            ),
        ])
        .unwrap();
        let mut seen = wifi("X");
        seen.metered = Some(false);
        assert!(matches!(
            set.select(&seen),
            Err(PolicyError::Ambiguous { .. })
        ));
    }

    #[test]
    fn hotspots_are_recognised_by_their_fingerprints() {
        let ios = Observation {
            addresses: vec!["172.20.10.3".parse().unwrap()],
            ..Observation::default()
        };
        let android = Observation {
            android_metered: true,
            ..Observation::default()
        };
        let local_mac = Observation {
            gateway_mac: Some("da:a1:19:00:00:01".into()),
            ..Observation::default()
        };
        let home = Observation {
            gateway_mac: Some("00:1a:2b:3c:4d:5e".into()),
            addresses: vec!["192.168.1.20".parse().unwrap()],
            ..Observation::default()
        };
        for seen in [&ios, &android, &local_mac] {
            assert!(seen.looks_like_hotspot(), "{seen:?}");
        }
        assert!(!home.looks_like_hotspot());
    }

    #[test]
    fn globs() {
        assert!(glob("wlan*", "wlan0"));
        assert!(glob("*", ""));
        assert!(!glob("en?s*", "enp3s0"));
        assert!(glob("enp?s*", "enp3s0"));
        assert!(!glob("wlan?", "wlan10"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
    }
}
