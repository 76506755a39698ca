//! A private D-Bus (a real `dbus-daemon` on a socket of its own) and a fake
//! NetworkManager served on it, for the tests of what the client reads from
//! NetworkManager.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use zbus::blocking::Connection;
use zbus::zvariant::OwnedObjectPath;

/// A `dbus-daemon` of the test's own, configured like a system bus that lets
/// anyone own and call anything; stopped when dropped.
#[derive(Debug)]
pub struct Bus {
    daemon: Child,
    address: String,
    /// Where its socket is (removed when dropped).
    _dir: tempfile::TempDir,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Bus {
    /// Starts one; `None` (after saying so) where `dbus-daemon` is not
    /// installed, unless `HOMING_REQUIRE_DBUS` is set (as CI sets it).
    ///
    /// # Panics
    /// When `HOMING_REQUIRE_DBUS` is set and there is no `dbus-daemon`, or it
    /// does not start.
    pub fn start() -> Option<Self> {
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
        Some(Self {
            daemon,
            address: address.trim().to_string(),
            _dir: dir,
        })
    }

    /// Its address (`unix:path=...`), for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }
}

/// A device of the fake NetworkManager.
#[derive(Debug, Clone)]
pub struct Device {
    interface: String,
    metered: u32,
    kind: u32,
    access_point: Option<(String, String)>,
    dhcp_vendor: Option<String>,
}

/// `NM_DEVICE_TYPE_WIFI`.
const WIFI: u32 = 2;

impl Device {
    /// A Wi-Fi device with its `NMMetered` value and, if associated, the access
    /// point's SSID and MAC address.
    pub fn wifi(interface: &str, metered: u32, access_point: Option<(&str, &str)>) -> Self {
        Self {
            interface: interface.into(),
            metered,
            kind: WIFI,
            access_point: access_point.map(|(ssid, mac)| (ssid.into(), mac.into())),
            dhcp_vendor: None,
        }
    }

    /// A device of another kind (a modem) with its `NMMetered` value.
    pub fn other(interface: &str, metered: u32) -> Self {
        Self {
            interface: interface.into(),
            metered,
            kind: 8,
            access_point: None,
            dhcp_vendor: None,
        }
    }

    /// With a DHCP lease whose vendor option (43) NetworkManager shows as
    /// `value`.
    pub fn with_dhcp_vendor(mut self, value: &str) -> Self {
        self.dhcp_vendor = Some(value.into());
        self
    }
}

fn path(text: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(text).expect("an object path")
}

const DEVICES: &str = "/org/freedesktop/NetworkManager/Devices";

struct Manager {
    interfaces: Vec<String>,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager")]
impl Manager {
    fn get_device_by_ip_iface(&self, iface: &str) -> zbus::fdo::Result<OwnedObjectPath> {
        self.interfaces
            .iter()
            .position(|i| i == iface)
            .map(|n| path(&format!("{DEVICES}/{n}")))
            .ok_or_else(|| {
                zbus::fdo::Error::UnknownObject("No device found for the requested iface.".into())
            })
    }
}

struct DeviceObject {
    metered: u32,
    kind: u32,
    dhcp: String,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Device")]
impl DeviceObject {
    #[zbus(property)]
    fn metered(&self) -> u32 {
        self.metered
    }
    #[zbus(property)]
    fn device_type(&self) -> u32 {
        self.kind
    }
    #[zbus(property)]
    fn dhcp4_config(&self) -> OwnedObjectPath {
        path(&self.dhcp)
    }
}

struct Dhcp4Config {
    vendor: String,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.DHCP4Config")]
impl Dhcp4Config {
    #[zbus(property)]
    fn options(&self) -> std::collections::HashMap<String, zbus::zvariant::OwnedValue> {
        let mut options = std::collections::HashMap::new();
        for (key, value) in [
            ("vendor_encapsulated_options", self.vendor.as_str()),
            ("ip_address", "192.168.43.17"),
        ] {
            options.insert(
                key.to_string(),
                zbus::zvariant::OwnedValue::try_from(zbus::zvariant::Value::from(value))
                    .expect("a string value"),
            );
        }
        options
    }
}

struct Wireless {
    access_point: String,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.Device.Wireless")]
impl Wireless {
    #[zbus(property)]
    fn active_access_point(&self) -> OwnedObjectPath {
        path(&self.access_point)
    }
}

struct AccessPoint {
    ssid: String,
    mac: String,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager.AccessPoint")]
impl AccessPoint {
    #[zbus(property)]
    fn ssid(&self) -> Vec<u8> {
        self.ssid.as_bytes().to_vec()
    }
    #[zbus(property)]
    fn hw_address(&self) -> String {
        self.mac.clone()
    }
}

/// Serves a NetworkManager with `devices` on the bus at `address` until the
/// returned connection is dropped.
///
/// # Panics
/// If it cannot be served.
pub fn network_manager(address: &str, devices: Vec<Device>) -> Connection {
    let mut builder = zbus::blocking::connection::Builder::address(address)
        .and_then(|b| b.name("org.freedesktop.NetworkManager"))
        .and_then(|b| {
            b.serve_at(
                "/org/freedesktop/NetworkManager",
                Manager {
                    interfaces: devices.iter().map(|d| d.interface.clone()).collect(),
                },
            )
        })
        .expect("the fake NetworkManager");
    for (n, device) in devices.into_iter().enumerate() {
        let at = format!("{DEVICES}/{n}");
        let dhcp = match &device.dhcp_vendor {
            Some(_) => format!("/org/freedesktop/NetworkManager/DHCP4Config/{n}"),
            None => "/".to_string(),
        };
        builder = builder
            .serve_at(
                path(&at).into_inner(),
                DeviceObject {
                    metered: device.metered,
                    kind: device.kind,
                    dhcp: dhcp.clone(),
                },
            )
            .expect("a device");
        if let Some(vendor) = device.dhcp_vendor.clone() {
            builder = builder
                .serve_at(path(&dhcp).into_inner(), Dhcp4Config { vendor })
                .expect("a DHCP configuration");
        }
        if device.kind == WIFI {
            let access_point = match &device.access_point {
                Some(_) => format!("/org/freedesktop/NetworkManager/AccessPoint/{n}"),
                None => "/".to_string(),
            };
            builder = builder
                .serve_at(
                    path(&at).into_inner(),
                    Wireless {
                        access_point: access_point.clone(),
                    },
                )
                .expect("a Wi-Fi device");
            if let Some((ssid, mac)) = device.access_point {
                builder = builder
                    .serve_at(path(&access_point).into_inner(), AccessPoint { ssid, mac })
                    .expect("an access point");
            }
        }
    }
    builder
        .build()
        .expect("the fake NetworkManager is on the bus")
}
