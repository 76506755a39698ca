//! Where Homing keeps its files.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The directories of one client.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Configuration: config file, master key, certificates, policies.
    pub config: PathBuf,
    /// State: the index, the spool, the newest head seen.
    pub state: PathBuf,
}

impl Paths {
    /// `--config DIR` if given, else the XDG configuration directory's `homing/`.
    /// State lives in `$HOMING_STATE` if set, else under `DIR/state` when a
    /// configuration directory is given, else in the XDG state directory's `homing/`.
    ///
    /// # Errors
    /// If no configuration directory can be found (no home directory).
    pub fn resolve(config: Option<&Path>) -> anyhow::Result<Self> {
        let explicit = config.is_some();
        let config = match config {
            Some(dir) => dir.to_path_buf(),
            None => dirs::config_dir()
                .context("no configuration directory found (is HOME set?); pass --config DIR")?
                .join("homing"),
        };
        let state = match std::env::var_os("HOMING_STATE") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ if explicit => config.join("state"),
            _ => dirs::state_dir()
                .or_else(dirs::data_local_dir)
                .context("no state directory found (is HOME set?); pass --config DIR")?
                .join("homing"),
        };
        Ok(Self { config, state })
    }

    /// The master key file.
    pub fn key_file(&self) -> PathBuf {
        self.config.join("master.key")
    }
}
