//! `homing key ...`: the master key's life cycle.
//!
//! The master key is the one secret that every backup depends on. Losing it loses
//! the backups, so every command that creates a key prints its paper form and says
//! so; no command ever overwrites an existing key file.

use std::fs;
use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, bail};
use homing_crypto::{KdfParams, KeyFile, MasterKey, from_paper, to_paper};
use zeroize::Zeroizing;

use crate::cli::{KeyCommand, NewPassphrase};
use crate::paths::Paths;

/// What every new key is announced with.
pub const LOSS_WARNING: &str = "\
Write the paper form above down, or print it, and keep it away from this laptop.
Homing encrypts everything with this key before it leaves the laptop: nobody, not
you and not whoever runs the store, can restore your backups without it.
If you lose the key (and this paper), you lose the backups.";

/// Runs a `homing key` command.
///
/// # Errors
/// If the key file cannot be read, written or unlocked, or the paper form is bad.
pub fn run(paths: &Paths, command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Generate {
            passphrase,
            kdf_memory_mib,
            kdf_passes,
        } => {
            let path = paths.key_file();
            refuse_existing(&path)?;
            let params = KdfParams::try_new(kdf_memory_mib.saturating_mul(1024), kdf_passes, 1)
                .context("invalid --kdf-memory-mib or --kdf-passes")?;
            let passphrase = new_passphrase(&passphrase)?;
            let master = MasterKey::generate()?;
            write_key(
                &path,
                &master,
                passphrase.as_ref().map(|p| p.as_str()),
                params,
            )?;
            say!("{}", to_paper(&master).as_str());
            say!(
                "Created master key {} in {}.\n",
                master.fingerprint(),
                path.display()
            );
            say!("{LOSS_WARNING}");
        }
        KeyCommand::Export {
            passphrase_file,
            json,
        } => {
            let master = load(&paths.key_file(), passphrase_file.as_deref())?;
            let paper = to_paper(&master);
            if json {
                let output = serde_json::json!({
                    "fingerprint": master.fingerprint().to_string(),
                    "paper_form": paper.as_str(),
                });
                println!("{output}");
            } else {
                println!("{}", paper.as_str());
                println!("{LOSS_WARNING}");
            }
        }
        KeyCommand::Import { from, passphrase } => {
            let path = paths.key_file();
            refuse_existing(&path)?;
            let text = read_paper(from.as_deref())?;
            let master = from_paper(&text).context("the paper form was not accepted")?;
            let passphrase = new_passphrase(&passphrase)?;
            write_key(
                &path,
                &master,
                passphrase.as_ref().map(|p| p.as_str()),
                KdfParams::DEFAULT,
            )?;
            println!(
                "Imported master key {} into {}.",
                master.fingerprint(),
                path.display()
            );
        }
        KeyCommand::Fingerprint {
            passphrase_file,
            json,
        } => {
            let path = paths.key_file();
            let master = load(&path, passphrase_file.as_deref())?;
            if json {
                let output = serde_json::json!({
                    "fingerprint": master.fingerprint().to_string(),
                    "key_file": path.display().to_string(),
                });
                println!("{output}");
            } else {
                println!("{}", master.fingerprint());
            }
        }
    }
    Ok(())
}

/// Reads and unlocks the master key, asking for the passphrase if needed.
///
/// # Errors
/// If the key file is missing, unsafe, damaged, or the passphrase is wrong.
pub fn load(path: &Path, passphrase_file: Option<&Path>) -> anyhow::Result<MasterKey> {
    let file = KeyFile::read(path).context(
        "cannot load the master key (create one with `homing key generate`, or \
         restore it with `homing key import`)",
    )?;
    let passphrase = if file.needs_passphrase() {
        Some(existing_passphrase(path, passphrase_file)?)
    } else {
        None
    };
    file.unlock(passphrase.as_ref().map(|p| p.as_bytes()))
        .with_context(|| format!("cannot unlock key file {}", path.display()))
}

fn refuse_existing(path: &Path) -> anyhow::Result<()> {
    if path.symlink_metadata().is_ok() {
        bail!(
            "a key file already exists at {}; Homing never overwrites a key \
             (use another --config directory, or move the file away if you really mean to replace it)",
            path.display()
        );
    }
    Ok(())
}

fn write_key(
    path: &Path,
    master: &MasterKey,
    passphrase: Option<&str>,
    params: KdfParams,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)
            .with_context(|| format!("cannot create configuration directory {}", dir.display()))?;
    }
    let file = KeyFile::new(master, passphrase.map(|p| (p.as_bytes(), params)))?;
    file.write_new(path)?;
    Ok(())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)
}

/// The passphrase for a new key file: from a file, none, or asked twice on a terminal.
fn new_passphrase(choice: &NewPassphrase) -> anyhow::Result<Option<Zeroizing<String>>> {
    if choice.no_passphrase {
        return Ok(None);
    }
    if let Some(file) = &choice.passphrase_file {
        return passphrase_from_file(file).map(Some);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase choice given: pass --passphrase-file FILE or --no-passphrase");
    }
    let first = Zeroizing::new(
        rpassword::prompt_password("Passphrase for the key file (empty for none): ")
            .context("cannot read the passphrase from the terminal")?,
    );
    if first.is_empty() {
        return Ok(None);
    }
    let second = Zeroizing::new(
        rpassword::prompt_password("The same passphrase again: ")
            .context("cannot read the passphrase from the terminal")?,
    );
    if first != second {
        bail!("the two passphrases differ; nothing was written");
    }
    Ok(Some(first))
}

fn existing_passphrase(key: &Path, file: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    if let Some(file) = file {
        return passphrase_from_file(file);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "key file {} is protected by a passphrase: pass --passphrase-file FILE",
            key.display()
        );
    }
    let prompt = format!("Passphrase for {}: ", key.display());
    Ok(Zeroizing::new(
        rpassword::prompt_password(prompt)
            .context("cannot read the passphrase from the terminal")?,
    ))
}

/// The first line of a passphrase file, without its line ending.
fn passphrase_from_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        fs::read_to_string(path)
            .with_context(|| format!("cannot read passphrase file {}", path.display()))?,
    );
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!(
            "passphrase file {} is empty (use --no-passphrase for no passphrase)",
            path.display()
        );
    }
    Ok(Zeroizing::new(line.to_string()))
}

fn read_paper(from: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    if let Some(path) = from {
        return fs::read_to_string(path)
            .map(Zeroizing::new)
            .with_context(|| format!("cannot read the paper form from {}", path.display()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Type the paper form (9 groups), then an empty line:");
    }
    let mut text = Zeroizing::new(String::new());
    let mut line = Zeroizing::new(String::new());
    // Stop at an empty line after some input, so that typing needs no Ctrl-D.
    loop {
        line.clear();
        if stdin
            .read_line(&mut line)
            .context("cannot read standard input")?
            == 0
        {
            break;
        }
        if line.trim().is_empty() && !text.trim().is_empty() {
            break;
        }
        text.push_str(&line);
    }
    Ok(text)
}
