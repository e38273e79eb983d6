//! Where the product binary `ferry` is: the lab drives it as a host would, by its command line.

use std::path::PathBuf;

/// The variable that names the `ferry` binary explicitly.
pub const FERRY_BIN: &str = "FERRY_BIN";

/// Why the `ferry` binary was not found.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("{FERRY_BIN} names {0}, which is not a file")]
    NotAFile(PathBuf),
    #[error("cannot tell where this program is")]
    CurrentExe(#[source] std::io::Error),
    #[error(
        "the ferry binary is not beside this program (looked in {0}); build it with \
         `cargo build --release -p ferry`, or name it with {FERRY_BIN}"
    )]
    Missing(PathBuf),
}

/// `$FERRY_BIN` if set; else the `ferry` beside this program's executable (where cargo puts
/// both binaries of a workspace), or one folder up (cargo's test executables live in `deps/`).
pub fn ferry_binary() -> Result<PathBuf, FindError> {
    if let Some(path) = std::env::var_os(FERRY_BIN).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(FindError::NotAFile(path))
        };
    }
    let exe = std::env::current_exe().map_err(FindError::CurrentExe)?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let found = [Some(dir.as_path()), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("ferry"))
        .find(|p| p.is_file());
    found.ok_or(FindError::Missing(dir))
}
