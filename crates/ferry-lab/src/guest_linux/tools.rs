//! Running the host's tools: apt, dpkg-deb and the (de)compressors.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Why a host tool did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program} is not installed ({hint})")]
    NotInstalled { program: String, hint: &'static str },
    #[error("cannot run {program}")]
    Run {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot feed {program}")]
    Feed {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("feeding {0} panicked")]
    FeedPanicked(String),
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot decompress {0}")]
    Decompress(PathBuf, #[source] Box<Error>),
}

type Result<T> = std::result::Result<T, Error>;

/// Makes the command's process die with ferry, so a killed build leaves no apt-get or
/// dpkg-deb writing into the cache behind it.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `cmd` to completion, with no stdin, and collects its output.
pub fn run(mut cmd: Command) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    die_with_parent(&mut cmd)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| tool_error(&program, e))
}

/// A clear message for a tool that cannot be started.
pub fn tool_error(program: &str, e: std::io::Error) -> Error {
    if e.kind() != std::io::ErrorKind::NotFound {
        return Error::Run {
            program: program.to_string(),
            source: e,
        };
    }
    let hint = match program {
        "apt-get" | "apt-cache" | "dpkg-deb" => {
            "ferry-lab guest build --linux fetches Debian's kernel with apt: it needs a Debian (or \
             derivative) host with apt and dpkg"
        }
        "xz" => "install xz-utils",
        "zstd" => "install zstd",
        "gzip" => "install gzip",
        "lz4" => "install lz4",
        "bzip2" => "install bzip2",
        _ => "is it installed?",
    };
    Error::NotInstalled {
        program: program.to_string(),
        hint,
    }
}

/// The last few lines of a command's stderr (and stdout), for error messages.
pub fn tail(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("Download is performed unsandboxed"))
        .collect();
    lines[lines.len().saturating_sub(6)..].join("\n")
}

/// Runs `program args` with `input` on stdin and returns its stdout; exit codes in `ok` count
/// as success (gzip says 2 for "trailing garbage ignored").
pub fn filter(program: &str, args: &[&str], input: &[u8], ok: &[i32]) -> Result<Vec<u8>> {
    let mut cmd = Command::new(program);
    let mut child = die_with_parent(&mut cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error(program, e))?;
    let mut stdin = child.stdin.take().expect("stdin was asked to be piped");
    let (output, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input));
        let output = child.wait_with_output();
        (output, writer.join())
    });
    let output = output.map_err(|source| Error::Run {
        program: program.to_string(),
        source,
    })?;
    match written {
        Ok(Ok(())) => {}
        // The program may stop reading once it has what it wants (xz --single-stream).
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Ok(Err(source)) => {
            return Err(Error::Feed {
                program: program.to_string(),
                source,
            })
        }
        Err(_) => return Err(Error::FeedPanicked(program.to_string())),
    }
    let code = output.status.code().unwrap_or(-1);
    if !ok.contains(&code) {
        return Err(Error::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

/// A kernel module's bytes, decompressed if it is `.ko.xz`, `.ko.zst` or `.ko.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Read(path.into(), e))?;
    let name = path.to_string_lossy();
    let plain = if name.ends_with(".xz") {
        filter("xz", &["-dc"], &bytes, &[0])
    } else if name.ends_with(".zst") {
        filter("zstd", &["-dc"], &bytes, &[0])
    } else if name.ends_with(".gz") {
        filter("gzip", &["-dc"], &bytes, &[0])
    } else {
        return Ok(bytes);
    };
    plain.map_err(|e| Error::Decompress(path.into(), Box::new(e)))
}
