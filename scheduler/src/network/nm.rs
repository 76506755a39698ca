//! NetworkManager's view of a link, over D-Bus (Linux, where NetworkManager
//! runs): the Wi-Fi network's name and access point, and the metered flag that
//! NetworkManager takes from the connection's settings or guesses (a phone's
//! hotspot announces itself; a mobile broadband modem is metered).
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
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);

const SERVICE: &str = "org.freedesktop.NetworkManager";
const PATH: &str = "/org/freedesktop/NetworkManager";
const DEVICE: &str = "org.freedesktop.NetworkManager.Device";
const WIRELESS: &str = "org.freedesktop.NetworkManager.Device.Wireless";
const ACCESS_POINT: &str = "org.freedesktop.NetworkManager.AccessPoint";
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
    let metered = match properties.get_property::<u32>("Metered").ok()? {
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
    use std::io::BufRead;
    use std::process::{Child, Command, Stdio};

    use zbus::zvariant::OwnedObjectPath;

    use super::*;

    /// A private bus: a real `dbus-daemon` on a socket in a temporary directory.
    struct Bus {
        daemon: Child,
        address: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
    }

    fn bus() -> Option<Bus> {
        if Command::new("dbus-daemon")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("HOMING_REQUIRE_DBUS").is_none(),
                "HOMING_REQUIRE_DBUS is set but dbus-daemon is not installed"
            );
            eprintln!("dbus-daemon is not installed: the NetworkManager test is skipped");
            return None;
        }
        let dir = tempfile::tempdir().expect("a directory");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                dir.path().display()
            ),
        )
        .expect("the bus configuration");
        let mut daemon = Command::new("dbus-daemon")
            .arg("--nofork")
            .arg("--print-address")
            .arg(format!("--config-file={}", config.display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon starts");
        let mut address = String::new();
        std::io::BufReader::new(daemon.stdout.take().expect("piped"))
            .read_line(&mut address)
            .expect("dbus-daemon says where it listens");
        Some(Bus {
            daemon,
            address: address.trim().to_string(),
            _dir: dir,
        })
    }

    fn path(text: &str) -> OwnedObjectPath {
        OwnedObjectPath::try_from(text).expect("an object path")
    }

    struct Manager;

    #[zbus::interface(name = "org.freedesktop.NetworkManager")]
    impl Manager {
        fn get_device_by_ip_iface(&self, iface: &str) -> zbus::fdo::Result<OwnedObjectPath> {
            match iface {
                "wlan0" => Ok(path("/org/freedesktop/NetworkManager/Devices/3")),
                "usb0" => Ok(path("/org/freedesktop/NetworkManager/Devices/4")),
                "wlan1" => Ok(path("/org/freedesktop/NetworkManager/Devices/5")),
                _ => Err(zbus::fdo::Error::UnknownObject(
                    "No device found for the requested iface.".into(),
                )),
            }
        }
    }

    struct Device {
        metered: u32,
        kind: u32,
    }

    #[zbus::interface(name = "org.freedesktop.NetworkManager.Device")]
    impl Device {
        #[zbus(property)]
        fn metered(&self) -> u32 {
            self.metered
        }
        #[zbus(property)]
        fn device_type(&self) -> u32 {
            self.kind
        }
    }

    struct Wireless {
        access_point: &'static str,
    }

    #[zbus::interface(name = "org.freedesktop.NetworkManager.Device.Wireless")]
    impl Wireless {
        #[zbus(property)]
        fn active_access_point(&self) -> OwnedObjectPath {
            path(self.access_point)
        }
    }

    struct AccessPoint;

    #[zbus::interface(name = "org.freedesktop.NetworkManager.AccessPoint")]
    impl AccessPoint {
        #[zbus(property)]
        fn ssid(&self) -> Vec<u8> {
            "Café Wi-Fi".as_bytes().to_vec()
        }
        #[zbus(property)]
        fn hw_address(&self) -> String {
            "AA:BB:CC:DD:EE:0F".into()
        }
    }

    /// A NetworkManager with three devices: Wi-Fi on a café's access point
    /// (guessed not metered), a USB modem (metered), and Wi-Fi associated with
    /// nothing (metered unknown).
    fn network_manager(address: &str) -> Connection {
        let devices = "/org/freedesktop/NetworkManager/Devices";
        zbus::blocking::connection::Builder::address(address)
            .and_then(|b| b.name(SERVICE))
            .and_then(|b| b.serve_at(PATH, Manager))
            .and_then(|b| {
                b.serve_at(
                    format!("{devices}/3"),
                    Device {
                        metered: 4,
                        kind: DEVICE_TYPE_WIFI,
                    },
                )
            })
            .and_then(|b| {
                b.serve_at(
                    format!("{devices}/3"),
                    Wireless {
                        access_point: "/org/freedesktop/NetworkManager/AccessPoint/7",
                    },
                )
            })
            .and_then(|b| b.serve_at("/org/freedesktop/NetworkManager/AccessPoint/7", AccessPoint))
            .and_then(|b| {
                b.serve_at(
                    format!("{devices}/4"),
                    Device {
                        metered: 1,
                        kind: 8,
                    },
                )
            })
            .and_then(|b| {
                b.serve_at(
                    format!("{devices}/5"),
                    Device {
                        metered: 0,
                        kind: DEVICE_TYPE_WIFI,
                    },
                )
            })
            .and_then(|b| b.serve_at(format!("{devices}/5"), Wireless { access_point: "/" }))
            .and_then(zbus::blocking::connection::Builder::build)
            .expect("the fake NetworkManager is on the bus")
    }

    #[test]
    fn wifi_names_access_points_and_the_metered_flag_come_from_network_manager() {
        let Some(bus) = bus() else { return };
        let client = zbus::blocking::connection::Builder::address(bus.address.as_str())
            .and_then(|b| b.method_timeout(TIMEOUT).build())
            .expect("a client connection");
        // No NetworkManager on the bus: nothing is seen, and nothing waits.
        assert_eq!(look_on(&client, "wlan0"), None);
        let service = network_manager(&bus.address);
        assert_eq!(
            look_on(&client, "wlan0"),
            Some(View {
                ssid: Some("Café Wi-Fi".into()),
                bssid: Some("aa:bb:cc:dd:ee:0f".into()),
                metered: Some(false),
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
        // An interface NetworkManager does not manage.
        assert_eq!(look_on(&client, "veth7"), None);
        drop(service);
    }
}
