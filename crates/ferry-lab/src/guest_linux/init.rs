//! The guest's `/init`: a busybox shell script.

use std::fmt::Write;

/// Printed once the root file systems are mounted, before any module loads.
pub const INIT_LINE: &str = "ferry-linux: init";
/// The start of the ready line: `ferry-linux: ready kernel=<uname -r> cpus=<nproc> ...`.
pub const READY_PREFIX: &str = "ferry-linux: ready";
/// The start of the heartbeat line: `ferry-linux: alive uptime=<seconds from /proc/uptime>`.
pub const ALIVE_PREFIX: &str = "ferry-linux: alive uptime=";
/// Seconds between heartbeats, unless the command line says `ferry.heartbeat=<seconds>`.
pub const HEARTBEAT_SECONDS: u32 = 2;
/// Printed before `ferry.exit=` powers the guest off or restarts it.
pub const EXIT_PREFIX: &str = "ferry-linux: exit ";

/// The `/init` script that loads `modules` (names; files at `/lib/modules/<name>.ko`) in the
/// given order, mounts `/dev/vda` read-only at `/mnt` if there is one, prints the ready line
/// and then a heartbeat forever (PID 1 must not exit).
pub fn init_script(modules: &[String]) -> String {
    let mut loads = String::new();
    for name in modules {
        // Module names are [A-Za-z0-9_]; nothing here needs quoting.
        let _ = writeln!(loads, "load {name}");
    }
    format!(
        r#"#!/bin/sh
# /init of ferry's Linux test guest, written by `ferry-lab guest build --linux`.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || echo "ferry-linux: cannot mount devtmpfs"
exec </dev/console >/dev/console 2>&1
echo "{INIT_LINE}"

load() {{
  if insmod "/lib/modules/$1.ko"; then
    echo "ferry-linux: loaded $1"
  else
    echo "ferry-linux: cannot load $1"
  fi
}}
{loads}
# A virtio block device (virtio device id 2) becomes /dev/vda; give it a moment to appear.
devices=0
disk=no
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] || continue
  devices=$((devices + 1))
  [ "$(cat "$d/device")" = "0x0002" ] && disk=yes
done
echo "ferry-linux: virtio devices=$devices"
if [ "$disk" = yes ]; then
  i=0
  while [ ! -b /dev/vda ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
fi
if [ -b /dev/vda ]; then
  if mount -o ro /dev/vda /mnt; then
    echo "ferry-linux: mounted /dev/vda read-only at /mnt"
  else
    echo "ferry-linux: cannot mount /dev/vda; going on without it"
  fi
else
  echo "ferry-linux: no virtio disk"
fi

heartbeat={HEARTBEAT_SECONDS}
then_exit=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ferry.heartbeat=*) heartbeat="${{arg#ferry.heartbeat=}}" ;;
    ferry.exit=*) then_exit="${{arg#ferry.exit=}}" ;;
  esac
done

mem=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
echo "{READY_PREFIX} kernel=$(uname -r) cpus=$(nproc) mem_kib=$mem"
# ferry.exit=poweroff|reboot: leave through the kernel's own power-off or restart path.
case "$then_exit" in
  poweroff) echo "{EXIT_PREFIX}poweroff"; poweroff -f ;;
  reboot) echo "{EXIT_PREFIX}reboot"; reboot -f ;;
esac
while :; do
  read -r up idle </proc/uptime
  echo "{ALIVE_PREFIX}$up"
  sleep "$heartbeat" || sleep {HEARTBEAT_SECONDS}
done
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> Vec<String> {
        ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn loads_modules_in_the_given_order() {
        let script = init_script(&modules());
        assert!(script.starts_with("#!/bin/sh\n"));
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("no {needle:?}"))
        };
        assert!(at("mount -t proc") < at(INIT_LINE));
        assert!(at(INIT_LINE) < at("load virtio_ring\n"));
        assert!(at("load virtio_ring\n") < at("load virtio\n"));
        assert!(at("load virtio\n") < at("load virtio_mmio\n"));
        assert!(at("load virtio_mmio\n") < at("load virtio_blk\n"));
        assert!(at("load virtio_blk\n") < at("mount -o ro /dev/vda /mnt"));
        assert!(at("mount -o ro /dev/vda /mnt") < at(READY_PREFIX));
        assert!(at(READY_PREFIX) < at(ALIVE_PREFIX));
        assert!(script.contains("insmod \"/lib/modules/$1.ko\""));
        assert!(script.contains("cannot mount /dev/vda"));
    }

    #[test]
    fn powers_off_or_restarts_only_when_asked() {
        let script = init_script(&[]);
        let ready = script.find(READY_PREFIX).expect("ready");
        let off = script.find("poweroff -f").expect("poweroff");
        let restart = script.find("reboot -f").expect("reboot");
        assert!(ready < off && ready < restart);
        assert!(script.contains("ferry.exit=*) then_exit="));
        assert!(script.contains("case \"$then_exit\" in"));
    }

    #[test]
    fn never_exits() {
        let script = init_script(&[]);
        assert!(script.contains("while :; do"));
        assert!(!script.contains("\nexit"));
        assert!(script.contains("echo \"ferry-linux: ready kernel=$(uname -r) cpus=$(nproc)"));
        assert!(script.contains("echo \"ferry-linux: alive uptime=$up\""));
    }

    #[test]
    fn is_valid_shell() {
        // `sh -n` parses without running; busybox's sh is the one the guest uses.
        let path = std::env::temp_dir().join(format!("ferry-init-test-{}", std::process::id()));
        std::fs::write(&path, init_script(&modules())).expect("write");
        for shell in ["/bin/busybox", "/bin/sh"] {
            if !std::path::Path::new(shell).exists() {
                continue;
            }
            let mut cmd = std::process::Command::new(shell);
            if shell.ends_with("busybox") {
                cmd.arg("sh");
            }
            let out = cmd.arg("-n").arg(&path).output().expect("run the shell");
            assert!(
                out.status.success(),
                "{shell}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
