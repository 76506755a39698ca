//! NetworkManager's view of a link, over D-Bus (Linux, where NetworkManager
//! runs): the Wi-Fi network's name and access point, the metered flag that
//! NetworkManager takes from the connection's settings or guesses (a phone's
//! hotspot announces itself; a mobile broadband modem is metered), and
//! Android's hotspot mark in the DHCP lease.
//!
//! One short look per observation: a connection to the system bus, a question
//! whether NetworkManager is there at all (so that D-Bus never starts it), and
//! a few property reads, each bounded by [`TIMEOUT`]. Anything missing (no bus,
//! no NetworkManager, an interface it does not manage) is simply not seen.

use std::time::Duration;

use zbus::blocking::{Connection, Proxy};
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

/// How long any one question may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

const SERVICE: &str = "org.freedesktop.NetworkManager";
const PATH: &str = "/org/freedesktop/NetworkManager";
const DEVICE: &str = "org.freedesktop.NetworkManager.Device";
const WIRELESS: &str = "org.freedesktop.NetworkManager.Device.Wireless";
const ACCESS_POINT: &str = "org.freedesktop.NetworkManager.AccessPoint";
const DHCP4_CONFIG: &str = "org.freedesktop.NetworkManager.DHCP4Config";
/// `NM_DEVICE_TYPE_WIFI`.
const DEVICE_TYPE_WIFI: u32 = 2;

/// What NetworkManager says of an interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The Wi-Fi network's name (SSID), for a Wi-Fi interface associated with
    /// an access point.
    pub ssid: Option<String>,
    /// The access point's MAC address (BSSID), lower-case.
    pub bssid: Option<String>,
    /// Whether the link is metered (`NMMetered`: yes or guessed yes, no or
    /// guessed no); `None` when NetworkManager does not know.
    pub metered: Option<bool>,
    /// Whether the DHCP lease carries Android's hotspot mark (vendor option
    /// 43 = `ANDROID_METERED`).
    pub android_metered: bool,
}

/// Whether a DHCP option's value, as NetworkManager shows it (the text, or
/// its bytes in hex with colons, depending on the DHCP client), says
/// `ANDROID_METERED`.
fn says_android_metered(value: &str) -> bool {
    const MARK: &str = "ANDROID_METERED";
    if value.contains(MARK) {
        return true;
    }
    let bytes: Option<Vec<u8>> = value
        .split(':')
        .map(|octet| u8::from_str_radix(octet.trim(), 16).ok())
        .collect();
    bytes.is_some_and(|bytes| bytes.windows(MARK.len()).any(|w| w == MARK.as_bytes()))
}

/// NetworkManager's view of `interface`, from the system bus.
pub fn look(interface: &str) -> Option<View> {
    let connection = zbus::blocking::connection::Builder::system()
        .ok()?
        .method_timeout(TIMEOUT)
        .build()
        .ok()?;
    look_on(&connection, interface)
}

fn proxy<'a>(connection: &Connection, path: &'a str, interface: &'a str) -> Option<Proxy<'a>> {
    zbus::blocking::proxy::Builder::<Proxy<'_>>::new(connection)
        .destination(SERVICE)
        .ok()?
        .path(path)
        .ok()?
        .interface(interface)
        .ok()?
        .cache_properties(CacheProperties::No)
        .build()
        .ok()
}

/// NetworkManager's view of `interface`, asked on `connection`.
pub fn look_on(connection: &Connection, interface: &str) -> Option<View> {
    let bus = zbus::blocking::fdo::DBusProxy::new(connection).ok()?;
    if !bus
        .name_has_owner(SERVICE.try_into().ok()?)
        .unwrap_or(false)
    {
        return None;
    }
    let manager = proxy(connection, PATH, SERVICE)?;
    let device: OwnedObjectPath = manager.call("GetDeviceByIpIface", &(interface,)).ok()?;
    let device = device.as_str().to_string();
    let properties = proxy(connection, &device, DEVICE)?;
    // A property that cannot be read is unknown; the others still count.
    let metered = match properties.get_property::<u32>("Metered").unwrap_or(0) {
        // NM_METERED_YES, NM_METERED_GUESS_YES
        1 | 3 => Some(true),
        // NM_METERED_NO, NM_METERED_GUESS_NO
        2 | 4 => Some(false),
        _ => None,
    };
    let mut view = View {
        metered,
        ..View::default()
    };
    if let Ok(dhcp) = properties.get_property::<OwnedObjectPath>("Dhcp4Config")
        && dhcp.as_str() != "/"
        && let Some(config) = proxy(connection, dhcp.as_str(), DHCP4_CONFIG)
        && let Ok(options) = config
            .get_property::<std::collections::HashMap<String, zbus::zvariant::OwnedValue>>(
                "Options",
            )
    {
        view.android_metered = options
            .get("vendor_encapsulated_options")
            .and_then(|value| String::try_from(value.clone()).ok())
            .is_some_and(|value| says_android_metered(&value));
    }
    if properties.get_property::<u32>("DeviceType").ok() == Some(DEVICE_TYPE_WIFI)
        && let Some(wireless) = proxy(connection, &device, WIRELESS)
        && let Ok(access_point) = wireless.get_property::<OwnedObjectPath>("ActiveAccessPoint")
        && access_point.as_str() != "/"
        && let Some(access_point) = proxy(connection, access_point.as_str(), ACCESS_POINT)
    {
        view.ssid = access_point
            .get_property::<Vec<u8>>("Ssid")
            .ok()
            .filter(|ssid| !ssid.is_empty())
            .map(|ssid| String::from_utf8_lossy(&ssid).into_owned());
        view.bssid = access_point
            .get_property::<String>("HwAddress")
            .ok()
            .filter(|mac| !mac.is_empty())
            .map(|mac| mac.to_ascii_lowercase());
    }
    Some(view)
}

#[cfg(test)]
mod tests {
    use homing_e2e::dbus::{Bus, Device, network_manager};

    use super::*;

    #[test]
    fn androids_mark_is_read_as_text_or_as_hex() {
        assert!(says_android_metered("ANDROID_METERED"));
        assert!(says_android_metered(
            "41:4e:44:52:4f:49:44:5f:4d:45:54:45:52:45:44"
        ));
        assert!(!says_android_metered("41:4e:44"));
        assert!(!says_android_metered(""));
        assert!(!says_android_metered("zz:zz"));
    }

    #[test]
    fn wifi_names_access_points_and_the_metered_flag_come_from_network_manager() {
        let Some(bus) = Bus::start() else { return };
        let client = zbus::blocking::connection::Builder::address(bus.address())
            .and_then(|b| b.method_timeout(TIMEOUT).build())
            .expect("a client connection");
        // No NetworkManager on the bus: nothing is seen, and nothing waits.
        assert_eq!(look_on(&client, "wlan0"), None);
        let service = network_manager(
            bus.address(),
            vec![
                // Wi-Fi on a cafe's access point, guessed not metered.
                Device::wifi("wlan0", 4, Some(("Café Wi-Fi", "AA:BB:CC:DD:EE:0F"))),
                // A phone's hotspot: its lease carries Android's mark (in hex, as
                // NetworkManager with dhclient shows it).
                Device::wifi("wlan2", 0, Some(("Pixel", "02:11:22:33:44:55")))
                    .with_dhcp_vendor("41:4e:44:52:4f:49:44:5f:4d:45:54:45:52:45:44"),
                // A USB modem, metered.
                Device::other("usb0", 1),
                // Wi-Fi associated with nothing, metered unknown.
                Device::wifi("wlan1", 0, None),
            ],
        );
        assert_eq!(
            look_on(&client, "wlan0"),
            Some(View {
                ssid: Some("Café Wi-Fi".into()),
                bssid: Some("aa:bb:cc:dd:ee:0f".into()),
                metered: Some(false),
                android_metered: false,
            })
        );
        assert_eq!(
            look_on(&client, "usb0"),
            Some(View {
                metered: Some(true),
                ..View::default()
            })
        );
        assert_eq!(look_on(&client, "wlan1"), Some(View::default()));
        assert_eq!(
            look_on(&client, "wlan2"),
            Some(View {
                ssid: Some("Pixel".into()),
                bssid: Some("02:11:22:33:44:55".into()),
                metered: None,
                android_metered: true,
            })
        );
        // An interface NetworkManager does not manage.
        assert_eq!(look_on(&client, "veth7"), None);
        drop(service);
    }
}
