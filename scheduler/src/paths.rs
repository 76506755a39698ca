//! Where Homing keeps its files.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The directories of one client.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Configuration: config file, master key, certificates, policies.
    pub config: PathBuf,
}

impl Paths {
    /// `--config DIR` if given, else the XDG configuration directory's `homing/`.
    ///
    /// # Errors
    /// If no configuration directory can be found (no home directory).
    pub fn resolve(config: Option<&Path>) -> anyhow::Result<Self> {
        let config = match config {
            Some(dir) => dir.to_path_buf(),
            None => dirs::config_dir()
                .context("no configuration directory found (is HOME set?); pass --config DIR")?
                .join("homing"),
        };
        Ok(Self { config })
    }

    /// The master key file.
    pub fn key_file(&self) -> PathBuf {
        self.config.join("master.key")
    }
}
