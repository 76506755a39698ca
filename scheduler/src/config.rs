//! The client's configuration file, `config.toml` in the configuration directory.
//!
//! ```toml
//! [store]
//! address = "home.example.net:4170"   # host:port of `homing-store serve`
//! server_name = "home.example.net"    # name in the store's certificate
//! ca = "store-ca.crt"                 # relative paths are under the config dir
//! certificate = "client.crt"
//! key = "client.key"
//!
//! [spool]
//! limit_mib = 1024                    # sealed, not yet uploaded objects, at most
//!
//! [seal]
//! threads = 3                         # seal large files on 3 threads (default: cores - 1)
//!
//! [[set]]
//! name = "home"
//! paths = ["/home/me"]
//! exclude = ["target/", "*.iso", ".cache/"]   # gitignore-style
//! priority = "normal"                 # critical, normal or bulk
//! one_file_system = true
//! exclude_caches = true               # skip directories tagged CACHEDIR.TAG (the default)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The configuration file's name.
pub const FILE_NAME: &str = "config.toml";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The store server.
    pub store: StoreConfig,
    /// The local spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// How backups seal what they read.
    #[serde(default, skip_serializing_if = "SealConfig::is_default")]
    pub seal: SealConfig,
    /// Backup sets.
    #[serde(default, rename = "set", skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<BackupSet>,
}

/// Where the store is and how to prove who we are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `host:port` of the store server.
    pub address: String,
    /// The name the store's certificate carries.
    pub server_name: String,
    /// The store's CA certificate (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM).
    pub certificate: PathBuf,
    /// This client's private key (PEM).
    pub key: PathBuf,
}

/// The spool of sealed objects waiting for upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Size limit in MiB: when reached, a backup uploads what is spooled before it
    /// seals more, and stops (keeping everything sealed) if the store is away.
    pub limit_mib: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self { limit_mib: 1024 }
    }
}

/// The most threads `[seal] threads` may ask for: each holds a zstd context and
/// a 2 MiB segment in flight.
pub const MAX_SEALING_THREADS: usize = 256;

/// How a backup seals (chunks, compresses and encrypts) what it reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    /// Threads that seal a large file beside the thread that walks the tree
    /// (which spools what they seal, keeps the state and uploads), 2 to
    /// [`MAX_SEALING_THREADS`]; 1: the walking thread seals alone (one thread
    /// beside it was measured slower than either). `None`: every core but one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "sealing_threads"
    )]
    pub threads: Option<std::num::NonZeroUsize>,
}

/// `[seal] threads`: 1 to [`MAX_SEALING_THREADS`].
fn sealing_threads<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::num::NonZeroUsize>, D::Error> {
    let threads = i64::deserialize(deserializer)?;
    usize::try_from(threads)
        .ok()
        .filter(|&n| n <= MAX_SEALING_THREADS)
        .and_then(std::num::NonZeroUsize::new)
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "threads must be 1 to {MAX_SEALING_THREADS}, not {threads}"
            ))
        })
}

impl SealConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The threads that seal a large file: as configured, or every core but one
    /// (at least one). Measured on two cores (bench `backup`, initial backup),
    /// two threads sealing beside the walking thread cost about 5 % more CPU
    /// than the walking thread alone (medians 4.62 and 4.41 CPU-s/GB), at the
    /// same speed: a thread more than the cores, and every chunk handed from
    /// one thread to another, cost CPU that only pays where cores are to spare.
    pub fn threads(&self) -> usize {
        self.threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            std::num::NonZeroUsize::get,
        )
    }
}

/// Which data may use which links: the policy engine's priority class.
pub use homing_policy::Class as Priority;

/// A backup set: what to back up, under one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSet {
    /// Its name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Absolute paths of directories or files.
    pub paths: Vec<PathBuf>,
    /// gitignore-style patterns of what to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Its priority class.
    #[serde(default)]
    pub priority: Priority,
    /// Do not cross into other file systems (mount points) below the paths.
    #[serde(default)]
    pub one_file_system: bool,
    /// Leave out the contents of cache directories, those that hold a
    /// `CACHEDIR.TAG` file with the standard signature (cargo's `target/`, many
    /// browsers' and build tools' caches): they are kept as empty directories.
    /// On by default; `false` backs them up like any other directory.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub exclude_caches: bool,
}

fn yes() -> bool {
    true
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde passes a reference"
)]
fn is_true(value: &bool) -> bool {
    *value
}

impl Config {
    /// Reads `config.toml` from the configuration directory and resolves relative
    /// paths against it.
    ///
    /// # Errors
    /// A missing file (with the hint to run `homing init`), or a parse error with
    /// its line and column.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
                "no configuration at {}: run `homing init` first (or pass --config DIR)",
                path.display()
            ),
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        Self::parse(&text, &path, dir)
    }

    /// Parses configuration text; `path` names the file in errors, `dir` resolves
    /// relative paths.
    ///
    /// # Errors
    /// Parse errors as `FILE:LINE:COLUMN: what`, and invalid values.
    pub fn parse(text: &str, path: &Path, dir: &Path) -> anyhow::Result<Self> {
        let mut config: Self = toml::from_str(text).map_err(|error| {
            let (line, column) = error
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            anyhow::anyhow!(
                "{}:{line}:{column}: {}",
                path.display(),
                error.message().trim_end()
            )
        })?;
        for file in [
            &mut config.store.ca,
            &mut config.store.certificate,
            &mut config.store.key,
        ] {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        let mut names = std::collections::HashSet::new();
        for set in &config.sets {
            check_set_name(&set.name)
                .with_context(|| format!("{}: backup set `{}`", path.display(), set.name))?;
            if !names.insert(set.name.as_str()) {
                bail!(
                    "{}: backup set `{}` is defined twice",
                    path.display(),
                    set.name
                );
            }
            if set.paths.is_empty() {
                bail!("{}: backup set `{}` has no paths", path.display(), set.name);
            }
            for p in &set.paths {
                if p.is_relative() {
                    bail!(
                        "{}: backup set `{}`: path {} is not absolute",
                        path.display(),
                        set.name,
                        p.display()
                    );
                }
            }
        }
        Ok(config)
    }

    /// Writes the configuration to `config.toml` in `dir` (atomically).
    ///
    /// # Errors
    /// IO errors.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = toml::to_string_pretty(self).context("cannot serialise the configuration")?;
        let path = dir.join(FILE_NAME);
        let temporary = dir.join(format!("{FILE_NAME}.new"));
        std::fs::write(&temporary, text)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

/// Checks a backup set's name: it names index tables and appears in reports.
///
/// # Errors
/// For names that are empty, long, or have other characters than letters, digits,
/// `-`, `_`, `.`.
pub fn check_set_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("a set name is 1 to 64 letters, digits, `-`, `_` or `.`");
    }
    Ok(())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[store]
address = "127.0.0.1:4170"
server_name = "localhost"
ca = "store-ca.crt"
certificate = "/etc/homing/client.crt"
key = "client.key"

[[set]]
name = "home"
paths = ["/home/me"]
exclude = ["target/"]
priority = "critical"
"#;

    #[test]
    fn relative_credentials_are_under_the_config_dir() {
        let config = Config::parse(GOOD, Path::new("c.toml"), Path::new("/cfg")).unwrap();
        assert_eq!(config.store.ca, Path::new("/cfg/store-ca.crt"));
        assert_eq!(
            config.store.certificate,
            Path::new("/etc/homing/client.crt")
        );
        assert_eq!(config.sets[0].priority, Priority::Critical);
        assert_eq!(config.spool.limit_mib, 1024);
        assert_eq!(config.seal, SealConfig::default());
        assert!(config.seal.threads() >= 1);
    }

    #[test]
    fn sealing_threads_are_one_to_the_limit_and_default_to_every_core_but_one() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let config = Config::parse(GOOD, Path::new("c.toml"), Path::new("/cfg")).unwrap();
        assert_eq!(config.seal.threads(), cores.saturating_sub(1).max(1));
        let three = format!("{GOOD}\n[seal]\nthreads = 3\n");
        let config = Config::parse(&three, Path::new("c.toml"), Path::new("/cfg")).unwrap();
        assert_eq!(config.seal.threads(), 3);
        for bad in ["0", "257", "-1"] {
            let text = GOOD.replace("[[set]]", &format!("[seal]\nthreads = {bad}\n\n[[set]]"));
            let error = Config::parse(&text, Path::new("c.toml"), Path::new("/cfg"))
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("c.toml:10:11:"), "{bad}: {error}");
            assert!(error.contains("threads must be 1 to 256"), "{bad}: {error}");
        }
    }

    /// What `config.toml` holds once `config` is saved in `dir`.
    fn saved(config: &Config, dir: &Path) -> String {
        config.save(dir).unwrap();
        std::fs::read_to_string(dir.join(FILE_NAME)).unwrap()
    }

    #[test]
    fn the_sealing_threads_are_saved_only_when_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse(GOOD, Path::new("c.toml"), dir.path()).unwrap();
        let text = saved(&config, dir.path());
        assert!(!text.contains("[seal]"), "{text}");
        config.seal.threads = std::num::NonZeroUsize::new(3);
        let text = saved(&config, dir.path());
        let again = Config::parse(&text, Path::new("c.toml"), dir.path()).unwrap();
        assert_eq!(again.seal.threads(), 3);
        assert_eq!(again.sets, config.sets);
    }

    #[test]
    fn caches_are_left_out_unless_a_set_says_otherwise_and_saved_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse(GOOD, Path::new("c.toml"), dir.path()).unwrap();
        assert!(config.sets[0].exclude_caches);
        let text = saved(&config, dir.path());
        assert!(!text.contains("exclude_caches"), "{text}");
        config.sets[0].exclude_caches = false;
        let text = saved(&config, dir.path());
        assert!(text.contains("exclude_caches = false"), "{text}");
        let again = Config::parse(&text, Path::new("c.toml"), dir.path()).unwrap();
        assert!(!again.sets[0].exclude_caches);
        let bad = GOOD.replace("priority = \"critical\"", "exclude_caches = \"no\"");
        let error = Config::parse(&bad, Path::new("c.toml"), Path::new("/cfg"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("c.toml:") && error.contains("bool"),
            "{error}"
        );
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let bad = GOOD.replace("priority = \"critical\"", "priority = \"urgent\"");
        let error = Config::parse(&bad, Path::new("c.toml"), Path::new("/cfg"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("c.toml:13:12:"), "{error}");
        let unknown = GOOD.replace("[[set]]", "[[set]]\ncolour = \"red\"");
        let error = Config::parse(&unknown, Path::new("c.toml"), Path::new("/cfg"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("c.toml:10:") && error.contains("colour"),
            "{error}"
        );
    }

    #[test]
    fn bad_sets_are_refused() {
        for (from, to) in [
            ("name = \"home\"", "name = \"my home\""),
            ("paths = [\"/home/me\"]", "paths = [\"home/me\"]"),
            ("paths = [\"/home/me\"]", "paths = []"),
        ] {
            let bad = GOOD.replace(from, to);
            assert!(
                Config::parse(&bad, Path::new("c.toml"), Path::new("/cfg")).is_err(),
                "{to}"
            );
        }
    }

    #[test]
    fn a_saved_configuration_takes_appended_sets() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::parse(GOOD, Path::new("c.toml"), dir.path()).unwrap();
        config.sets.clear();
        config.save(dir.path()).unwrap();
        let mut text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        text.push_str("\n[[set]]\nname = \"more\"\npaths = [\"/srv\"]\n");
        let again = Config::parse(&text, Path::new("c.toml"), dir.path()).unwrap();
        assert_eq!(again.sets.len(), 1);
        assert_eq!(again.store, config.store);
    }
}
