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
/// The start of a NIC's lines: `ferry-linux: net <name> mac=<address> driver=<driver>` once it
/// appears, then `ferry-linux: net <name> up` (with ` ip=<A.B.C.D/N>` when the command line
/// says `ferry_ip=A.B.C.D/N`) or `ferry-linux: net <name> cannot ...`.
pub const NET_PREFIX: &str = "ferry-linux: net ";
/// The balloon's line, when the VM has one: `ferry-linux: balloon driver=<driver>
/// features=<the negotiated feature bits, as sysfs prints them>`.
pub const BALLOON_PREFIX: &str = "ferry-linux: balloon ";

/// The `/init` script that loads `modules` (names; files at `/lib/modules/<name>.ko`) in the
/// given order, mounts `/dev/vda` read-only at `/mnt` if there is one, reports every network
/// interface but `lo`, brings it up and gives the first one the address `ferry_ip=` names,
/// prints the ready line and then a heartbeat forever (PID 1 must not exit).
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
# A virtio NIC (id 1) becomes eth0.
devices=0
disk=no
nic=no
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] || continue
  devices=$((devices + 1))
  [ "$(cat "$d/device")" = "0x0002" ] && disk=yes
  [ "$(cat "$d/device")" = "0x0001" ] && nic=yes
done
echo "ferry-linux: virtio devices=$devices"
# A balloon (virtio device id 5): with its driver bound, the kernel hints and reports free
# pages to the host by itself.
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] && [ "$(cat "$d/device")" = "0x0005" ] || continue
  driver=$(readlink "$d/driver")
  echo "{BALLOON_PREFIX}driver=${{driver##*/}} features=$(cat "$d/features")"
done
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
ferry_ip=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ferry.heartbeat=*) heartbeat="${{arg#ferry.heartbeat=}}" ;;
    ferry.exit=*) then_exit="${{arg#ferry.exit=}}" ;;
    ferry_ip=*) ferry_ip="${{arg#ferry_ip=}}" ;;
  esac
done

# Network interfaces but lo: each is reported and brought up; the first one gets ferry_ip=.
nets() {{
  for n in /sys/class/net/*; do
    [ -e "$n" ] && [ "${{n##*/}}" != lo ] && echo "${{n##*/}}"
  done
}}
# A netmask from a prefix length, for ifconfig.
netmask() {{
  m=$(( (0xffffffff << (32 - $1)) & 0xffffffff ))
  echo "$((m >> 24 & 255)).$((m >> 16 & 255)).$((m >> 8 & 255)).$((m & 255))"
}}
link_up() {{
  if command -v ip >/dev/null; then ip link set "$1" up; else ifconfig "$1" up; fi
}}
add_address() {{
  if command -v ip >/dev/null; then
    ip addr add "$2" dev "$1"
  else
    ifconfig "$1" "${{2%/*}}" netmask "$(netmask "${{2#*/}}")"
  fi
}}
if [ "$nic" = yes ]; then
  i=0
  while [ -z "$(nets)" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
fi
for name in $(nets); do
  n=/sys/class/net/$name
  driver=$(readlink "$n/device/driver")
  echo "{NET_PREFIX}$name mac=$(cat "$n/address") driver=${{driver##*/}}"
  if ! link_up "$name"; then
    echo "{NET_PREFIX}$name cannot bring it up"
  elif [ -n "$ferry_ip" ]; then
    if add_address "$name" "$ferry_ip"; then
      echo "{NET_PREFIX}$name up ip=$ferry_ip"
    else
      echo "{NET_PREFIX}$name cannot set ip=$ferry_ip"
    fi
    ferry_ip=
  else
    echo "{NET_PREFIX}$name up"
  fi
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
    fn reports_and_brings_up_nics_before_the_ready_line() {
        let mut names = modules();
        names.push("virtio_net".into());
        let script = init_script(&names);
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("no {needle:?}"))
        };
        assert!(at("load virtio_net\n") < at("for name in $(nets); do"));
        assert!(at("ferry_ip=*) ferry_ip=") < at("for name in $(nets); do"));
        assert!(at("for name in $(nets); do") < at(READY_PREFIX));
        assert!(script.contains(&format!(
            "echo \"{NET_PREFIX}$name mac=$(cat \"$n/address\") driver=${{driver##*/}}\""
        )));
        assert!(script.contains("ip link set \"$1\" up"));
        assert!(script.contains("ip addr add \"$2\" dev \"$1\""));
        assert!(script.contains(&format!("echo \"{NET_PREFIX}$name up ip=$ferry_ip\"")));
    }

    #[test]
    fn netmask_from_prefix_length() {
        if !std::path::Path::new("/bin/busybox").exists() {
            return;
        }
        let script = init_script(&[]);
        let start = script.find("netmask() {").expect("netmask()");
        let end = start + script[start..].find("\n}\n").expect("end of netmask()") + 3;
        let function = &script[start..end];
        for (prefix, mask) in [
            ("24", "255.255.255.0"),
            ("16", "255.255.0.0"),
            ("30", "255.255.255.252"),
            ("32", "255.255.255.255"),
            ("0", "0.0.0.0"),
        ] {
            let out = std::process::Command::new("/bin/busybox")
                .args(["sh", "-c", &format!("{function}netmask {prefix}")])
                .output()
                .expect("run busybox sh");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                mask,
                "/{prefix}"
            );
        }
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
