//! Running the host's tools: apt, dpkg-deb and the (de)compressors.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};

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
pub fn tool_error(program: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() != std::io::ErrorKind::NotFound {
        return anyhow!(e).context(format!("cannot run {program}"));
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
    anyhow!("{program} is not installed ({hint})")
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
    let mut stdin = child.stdin.take().context("no stdin")?;
    let (output, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input));
        let output = child.wait_with_output();
        (output, writer.join())
    });
    let output = output.with_context(|| format!("cannot run {program}"))?;
    match written {
        Ok(Ok(())) => {}
        // The program may stop reading once it has what it wants (xz --single-stream).
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Ok(Err(e)) => return Err(e).with_context(|| format!("cannot feed {program}")),
        Err(_) => bail!("feeding {program} panicked"),
    }
    let code = output.status.code().unwrap_or(-1);
    if !ok.contains(&code) {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// A kernel module's bytes, decompressed if it is `.ko.xz`, `.ko.zst` or `.ko.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
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
    plain.with_context(|| format!("cannot decompress {}", path.display()))
}
