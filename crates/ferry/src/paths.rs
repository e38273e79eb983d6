//! Where ferry keeps its own files: a per-user cache for built guests and downloads.

use std::path::PathBuf;

/// `$FERRY_CACHE_DIR`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`, else a folder in
/// the system's temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ferry");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("ferry");
    }
    std::env::temp_dir().join("ferry-cache")
}

/// The source of the test guest, which lives beside this crate in the workspace.
pub fn testguest_source() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ferry-testguest")
}
