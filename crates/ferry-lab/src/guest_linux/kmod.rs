//! Which kernel modules the guest needs, and in which order to load them.
//!
//! A kernel package ships `modules.builtin` (what is compiled in) but not always
//! `modules.dep`: Debian's package leaves that to `depmod` at install time. So the dependency
//! graph comes from `modules.dep` when there is one, else from each module's own `.modinfo`
//! (`depends=a,b`), which is where depmod reads it from too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::elf::{self, Elf};
use super::tools;

/// Why the modules to load could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel modules depend on each other in a cycle through {0}")]
    Cycle(String),
    #[error("kernel module {name}{} is neither built in nor shipped", needed_by.as_ref().map(|p| format!(" (needed by {p})")).unwrap_or_default())]
    Missing {
        name: String,
        needed_by: Option<String>,
    },
    #[error("cannot list {0}")]
    List(PathBuf, #[source] std::io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Module(#[from] tools::Error),
    #[error("kernel module {0}")]
    Elf(String, #[source] elf::Error),
}

type Result<T> = std::result::Result<T, Error>;

/// A module the guest should load, and whether the build fails without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WantedModule {
    pub name: &'static str,
    pub required: bool,
}

/// A module file to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// The module's name (`virtio_blk`), which is also its file name in the initramfs.
    pub name: String,
    /// Where it is, possibly compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`).
    pub path: PathBuf,
}

/// One module in the dependency graph: its file, relative to the modules folder, and the
/// names of the modules it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub path: String,
    pub deps: Vec<String>,
}

/// A module's name from its path: the file name without `.ko` (and a compression suffix),
/// with `-` spelled `_`, the way the kernel names modules.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))
        .unwrap_or(file);
    stem.replace('-', "_")
}

/// Parses `modules.dep`: `kernel/a/b.ko: kernel/c.ko kernel/d.ko` per line.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Node> {
    let mut graph = BTreeMap::new();
    for line in text.lines() {
        let Some((module, deps)) = line.split_once(':') else {
            continue;
        };
        let module = module.trim();
        if module.is_empty() {
            continue;
        }
        graph.insert(
            module_name(module),
            Node {
                path: module.to_string(),
                deps: deps.split_whitespace().map(module_name).collect(),
            },
        );
    }
    graph
}

/// Parses `modules.builtin`: one `kernel/a/b.ko` per line.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
}

/// The `depends=` entry of a `.modinfo` section (NUL-separated `key=value` strings).
pub fn modinfo_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The load order for `wanted`: every module after the modules it depends on, each once,
/// built-in modules left out. A wanted module that is neither built in nor in the graph is an
/// error if it is required and skipped otherwise; a missing dependency is always an error.
pub fn load_order(
    graph: &BTreeMap<String, Node>,
    builtin: &BTreeSet<String>,
    wanted: &[WantedModule],
) -> Result<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        needed_by: Option<&str>,
        graph: &BTreeMap<String, Node>,
        builtin: &BTreeSet<String>,
        marks: &mut BTreeMap<String, Mark>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if builtin.contains(name) {
            return Ok(());
        }
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => return Err(Error::Cycle(name.to_string())),
            None => {}
        }
        let Some(node) = graph.get(name) else {
            return Err(Error::Missing {
                name: name.to_string(),
                needed_by: needed_by.map(String::from),
            });
        };
        marks.insert(name.to_string(), Mark::Visiting);
        for dep in &node.deps {
            visit(dep, Some(name), graph, builtin, marks, order)?;
        }
        marks.insert(name.to_string(), Mark::Done);
        order.push(name.to_string());
        Ok(())
    }

    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for want in wanted {
        if !want.required && !builtin.contains(want.name) && !graph.contains_key(want.name) {
            continue;
        }
        visit(want.name, None, graph, builtin, &mut marks, &mut order)?;
    }
    Ok(order)
}

/// Every module file under `dir` (recursively), by module name, as paths relative to `dir`.
fn scan_module_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.join("kernel")];
    while let Some(folder) = pending.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::List(folder, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::List(folder.clone(), e))?;
            let path = entry.path();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pending.push(path);
                continue;
            }
            let Ok(relative) = path.strip_prefix(dir) else {
                continue;
            };
            let relative = relative.to_string_lossy().into_owned();
            if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .any(|s| relative.ends_with(s))
            {
                found.insert(module_name(&relative), relative);
            }
        }
    }
    Ok(found)
}

/// The dependency graph of the modules reachable from `wanted`, read from the modules' own
/// `.modinfo` sections (for a modules folder without `modules.dep`).
fn graph_from_modinfo(
    dir: &Path,
    builtin: &BTreeSet<String>,
    wanted: &[WantedModule],
) -> Result<BTreeMap<String, Node>> {
    let files = scan_module_files(dir)?;
    let mut graph = BTreeMap::new();
    let mut pending: Vec<String> = wanted.iter().map(|w| w.name.to_string()).collect();
    while let Some(name) = pending.pop() {
        if graph.contains_key(&name) || builtin.contains(&name) {
            continue;
        }
        // Unknown names stay out of the graph; load_order says who needed them.
        let Some(relative) = files.get(&name) else {
            continue;
        };
        let bytes = super::read_module(&dir.join(relative))?;
        let elf = Elf::parse(&bytes).map_err(|e| Error::Elf(relative.clone(), e))?;
        let deps = modinfo_depends(
            elf.section(".modinfo")
                .map_err(|e| Error::Elf(relative.clone(), e))?
                .unwrap_or_default(),
        );
        pending.extend(deps.iter().cloned());
        graph.insert(
            name,
            Node {
                path: relative.clone(),
                deps,
            },
        );
    }
    Ok(graph)
}

/// The module files to load, in order, for `wanted` from the modules folder `dir`
/// (`lib/modules/<version>`).
pub fn plan(dir: &Path, wanted: &[WantedModule]) -> Result<Vec<ModuleFile>> {
    let builtin = match std::fs::read_to_string(dir.join("modules.builtin")) {
        Ok(text) => parse_builtin(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(Error::Read(dir.join("modules.builtin"), e)),
    };
    let graph = match std::fs::read_to_string(dir.join("modules.dep")) {
        Ok(text) => parse_modules_dep(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            graph_from_modinfo(dir, &builtin, wanted)?
        }
        Err(e) => return Err(Error::Read(dir.join("modules.dep"), e)),
    };
    let order = load_order(&graph, &builtin, wanted)?;
    Ok(order
        .into_iter()
        .filter_map(|name| {
            let node = graph.get(&name)?;
            Some(ModuleFile {
                path: dir.join(&node.path),
                name,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_DEP: &str = "\
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
";

    fn want(names: &[&'static str]) -> Vec<WantedModule> {
        names
            .iter()
            .map(|&name| WantedModule {
                name,
                required: true,
            })
            .collect()
    }

    #[test]
    fn names_follow_the_kernel() {
        assert_eq!(
            module_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz"),
            "crc32c_intel"
        );
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko"),
            "virtio_blk"
        );
        assert_eq!(module_name("virtio.ko.zst"), "virtio");
    }

    #[test]
    fn parses_modules_dep() {
        let graph = parse_modules_dep(SAMPLE_DEP);
        assert_eq!(graph.len(), 9);
        let blk = &graph["virtio_blk"];
        assert_eq!(blk.path, "kernel/drivers/block/virtio_blk.ko.xz");
        assert_eq!(blk.deps, ["virtio", "virtio_ring"]);
        assert!(graph["virtio_ring"].deps.is_empty());
        assert!(graph.contains_key("crc32c_intel"));
    }

    #[test]
    fn orders_dependencies_first_each_once() {
        let graph = parse_modules_dep(SAMPLE_DEP);
        let order = load_order(
            &graph,
            &BTreeSet::new(),
            &want(&["virtio_mmio", "virtio_blk", "ext4"]),
        )
        .expect("order");
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "crc16",
                "mbcache",
                "jbd2",
                "ext4"
            ]
        );
        for (i, name) in order.iter().enumerate() {
            for dep in &graph[name].deps {
                let at = order.iter().position(|n| n == dep).expect("dep is loaded");
                assert!(at < i, "{dep} must load before {name}");
            }
        }
    }

    #[test]
    fn builtin_modules_are_not_loaded() {
        let graph = parse_modules_dep(SAMPLE_DEP);
        let builtin = parse_builtin(
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio_mmio.ko\n",
        );
        let order =
            load_order(&graph, &builtin, &want(&["virtio_mmio", "virtio_blk"])).expect("order");
        assert_eq!(order, ["virtio_blk"]);
    }

    #[test]
    fn missing_modules_are_errors_unless_optional() {
        let graph = parse_modules_dep("kernel/a.ko: kernel/b.ko\n");
        let err = load_order(&graph, &BTreeSet::new(), &want(&["a"])).unwrap_err();
        assert!(err.to_string().contains("b (needed by a)"), "{err}");
        let err = load_order(&graph, &BTreeSet::new(), &want(&["nope"])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let optional = [WantedModule {
            name: "nope",
            required: false,
        }];
        assert!(load_order(&graph, &BTreeSet::new(), &optional)
            .expect("optional")
            .is_empty());
    }

    #[test]
    fn cycles_are_errors() {
        let graph = parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n");
        let err = load_order(&graph, &BTreeSet::new(), &want(&["a"])).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let info = b"alias=acpi*:LNRO0005:*\0depends=virtio,virtio_ring\0name=virtio_mmio\0";
        assert_eq!(modinfo_depends(info), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"depends=\0name=virtio_ring\0").is_empty());
    }

    #[test]
    fn plans_from_modinfo_without_modules_dep() {
        let dir = std::env::temp_dir().join(format!("ferry-kmod-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let module = |rel: &str, depends: &str| {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            let info = format!("depends={depends}\0name={}\0", module_name(rel));
            let elf = super::super::elf::tests::tiny_elf(&[(".modinfo", info.as_bytes())]);
            std::fs::write(path, elf).expect("write");
        };
        module("kernel/drivers/virtio/virtio_ring.ko", "");
        module("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        module("kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring");
        module("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring");
        module(
            "kernel/drivers/net/virtio_net.ko",
            "virtio,virtio_ring,net_failover",
        );
        std::fs::write(dir.join("modules.builtin"), "kernel/lib/crc16.ko\n").expect("write");
        let wanted = [
            WantedModule {
                name: "virtio_mmio",
                required: true,
            },
            WantedModule {
                name: "virtio_blk",
                required: true,
            },
            WantedModule {
                name: "crc16",
                required: false,
            },
        ];
        let plan = plan(&dir, &wanted).expect("plan");
        let names: Vec<_> = plan.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
        );
        assert_eq!(plan[3].path, dir.join("kernel/drivers/block/virtio_blk.ko"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
