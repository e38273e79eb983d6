//! Where ferry keeps its own files: a per-user cache for built guests and downloads.

use std::path::{Path, PathBuf};

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
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|crates| crates.join("ferry-testguest"))
        .unwrap_or_else(|| PathBuf::from("ferry-testguest"))
}

/// Where the test guest of `source` is built: one folder per checkout. Cargo's freshness
/// checks ignore where a package lives (paths relative to it, modification times), so two
/// checkouts sharing a target folder would reuse each other's build script output (with the
/// other checkout's linker script path in it) and even each other's binaries.
/// scripts/test.sh names the same folder.
pub fn testguest_target(source: &Path) -> PathBuf {
    let key: String = source
        .to_string_lossy()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    cache_dir().join("testguest-target").join(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_checkout_builds_its_test_guest_in_its_own_folder() {
        let a = testguest_target(Path::new("/work/main/crates/ferry-testguest"));
        let b = testguest_target(Path::new("/check/work/main/crates/ferry-testguest"));
        assert_ne!(a, b);
        assert_eq!(
            a.file_name().and_then(|n| n.to_str()),
            Some("_work_main_crates_ferry-testguest")
        );
        assert!(a.starts_with(cache_dir().join("testguest-target")));
    }
}
