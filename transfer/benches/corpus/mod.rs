//! Test data shared by the benches: random bytes and real text from this machine.

use std::path::{Path, PathBuf};

/// Where real text is looked for when no `--text-dir` is given: the cargo
/// registry's unpacked crate sources (Rust, C), C headers, Python's standard
/// library and package documentation. All of it is on a machine that built Homing.
pub(crate) fn default_text_dirs() -> Vec<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    let mut dirs: Vec<PathBuf> = cargo_home
        .into_iter()
        .map(|h| h.join("registry/src"))
        .collect();
    for dir in ["/usr/include", "/usr/lib/python3", "/usr/share/doc"] {
        dirs.push(dir.into());
    }
    dirs
}

/// Up to `len` bytes of the UTF-8 files under `dirs`, in a fixed (sorted) order.
pub(crate) fn text(len: usize, dirs: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(path) = stack.pop() {
        if out.len() >= len {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(&path) else {
                continue;
            };
            let mut children: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            children.sort();
            stack.extend(children.into_iter().rev());
        } else if meta.is_file() && meta.len() > 0 {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if std::str::from_utf8(&bytes).is_ok() {
                out.extend_from_slice(&bytes);
            }
        }
    }
    assert!(
        !out.is_empty(),
        "no text found under {dirs:?}; pass --text-dir DIR"
    );
    out.truncate(len);
    out.shrink_to_fit();
    out
}

/// `len` incompressible bytes, the same on every run.
pub(crate) fn random(len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new_derive_key("homing bench random data")
        .finalize_xof()
        .fill(&mut out);
    out
}
