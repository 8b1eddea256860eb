//! What the report says about the machine (CPU, cores, RAM, accelerator, QEMU), and host
//! memory per sandbox: the proportional set size of each sandbox's QEMU, read from `/proc`.
//!
//! PSS counts a page shared by n processes as 1/n to each, so the template's memory file,
//! mapped privately by every sandbox and faulted in from one page cache, is shared out
//! between them, and their own pages (what each guest wrote, QEMU's heap, the translation
//! cache) count whole.
//!
//! The translation cache is the anonymous mapping QEMU's TCG allocates for translated code
//! (`tb-size`, 32 MiB here) with read, write and execute permission: nothing else in QEMU is
//! mapped anonymous and executable. QEMU puts guard pages between its per-vCPU regions, so
//! the buffer shows up as several `rwxp` mappings next to `---p` ones; all `rwxp` anonymous
//! mappings together are the cache. Under KVM there is none.

use std::path::{Path, PathBuf};

use wrenn_agent::record::Phase;

/// The machine the bench ran on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) cores: usize,
    pub(crate) ram_gib: f64,
}

impl Machine {
    pub(crate) fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            ram_gib: mem_total_kib(&meminfo).unwrap_or(0) as f64 / (1024.0 * 1024.0),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    field_kib(meminfo, "MemTotal:")
}

/// The value of a `Key:   123 kB` line.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The 1-minute load average (`/proc/loadavg`), to tell a quiet machine from a busy one.
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `qemu-system-x86_64 --version`'s first line, or why there is none.
pub(crate) async fn qemu_version() -> String {
    let out = tokio::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        _ => "not found on this machine".to_owned(),
    }
}

/// The accelerator a running QEMU was started with: its `-accel` argument (`tcg,tb-size=32`).
pub(crate) fn qemu_accel(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    accel_arg(&cmdline)
}

/// The value after `-accel` in a NUL-separated command line.
fn accel_arg(cmdline: &[u8]) -> Option<String> {
    let mut args = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    args.find(|a| a == "-accel")?;
    args.next()
}

/// The accelerator guests get here, decided as the agent decides it (`WRENN_ACCEL`, else KVM
/// where it can run guests, else TCG).
pub(crate) fn accelerator() -> String {
    match wrenn_agent::accel::Accel::detect() {
        Ok(wrenn_agent::accel::Accel::Kvm) => "KVM".to_owned(),
        Ok(wrenn_agent::accel::Accel::Tcg) => "TCG".to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// One sandbox's QEMU memory, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct QemuMemory {
    /// Proportional set size of the whole process.
    pub(crate) pss_kib: u64,
    /// PSS of the translation cache mappings.
    pub(crate) tcg_pss_kib: u64,
    /// Their total size (what QEMU reserved: `tb-size`).
    pub(crate) tcg_size_kib: u64,
}

/// Reads `/proc/<pid>/smaps` of a QEMU.
pub(crate) fn qemu_memory(pid: u32) -> std::io::Result<QemuMemory> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let (tcg_size_kib, tcg_pss_kib) = translation_cache(&smaps);
    Ok(QemuMemory {
        pss_kib: field_kib(&rollup, "Pss:").unwrap_or(0),
        tcg_pss_kib,
        tcg_size_kib,
    })
}

/// (Size, Pss) in KiB of the anonymous `rwxp` mappings in an smaps text.
fn translation_cache(smaps: &str) -> (u64, u64) {
    let (mut size, mut pss) = (0, 0);
    let mut in_cache = false;
    for line in smaps.lines() {
        if let Some(is_cache) = mapping_header(line) {
            in_cache = is_cache;
        } else if in_cache {
            if let Some(v) = line.strip_prefix("Size:") {
                size += kib(v);
            } else if let Some(v) = line.strip_prefix("Pss:") {
                pss += kib(v);
            }
        }
    }
    (size, pss)
}

/// For a mapping's header line (`start-end perms offset dev inode [path]`): whether it is
/// anonymous and `rwxp`. `None` for the lines about a mapping.
fn mapping_header(line: &str) -> Option<bool> {
    let mut f = line.split_whitespace();
    let range = f.next()?;
    if !range.contains('-') || !range.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return None;
    }
    let perms = f.next()?;
    let (_offset, _dev, inode) = (f.next()?, f.next()?, f.next()?);
    let path = f.next();
    Some(perms == "rwxp" && inode == "0" && path.is_none())
}

fn kib(v: &str) -> u64 {
    v.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The QEMU pid of each running sandbox of the instance whose state directory is `state`,
/// from the agent's records (a pooled sandbox lives in its warm VM's directory, so its
/// directory name is not its ID).
pub(crate) fn qemu_pids(state: &Path) -> std::io::Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state.join("sandboxes"))? {
        let dir: PathBuf = entry?.path();
        let Ok(Some(rec)) = wrenn_agent::record::read(&dir) else {
            continue;
        };
        if let (Some(meta), Phase::Running { vm, .. }) = (rec.meta, rec.phase)
            && vm.alive()
        {
            out.push((meta.sandbox_id, vm.pid));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_fields() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        let meminfo = "MemTotal:       24641224 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total_kib(meminfo), Some(24641224));
    }

    #[test]
    fn accel_argument_of_a_command_line() {
        let cmd = b"qemu-system-x86_64\0-M\0microvm\0-accel\0tcg,tb-size=32\0-m\x00512\x00";
        assert_eq!(accel_arg(cmd).as_deref(), Some("tcg,tb-size=32"));
        assert_eq!(accel_arg(b"qemu-system-x86_64\0-m\x00512\x00"), None);
        assert_eq!(accel_arg(b"qemu\0-accel\0"), Some(String::new()));
    }

    #[test]
    fn translation_cache_is_the_anonymous_rwx_mappings() {
        // Two regions of the code buffer with a guard page between them, the memory file
        // (a private rw mapping of a file), QEMU's own code (r-xp of a file) and heap.
        let smaps = "\
7f0000000000-7f0001000000 rwxp 00000000 00:00 0 
Size:              16384 kB
Rss:                4000 kB
Pss:                4000 kB
7f0001000000-7f0001001000 ---p 00000000 00:00 0 
Size:                  4 kB
Pss:                   0 kB
7f0001001000-7f0002000000 rwxp 00000000 00:00 0 
Size:              16380 kB
Pss:                1000 kB
7f1000000000-7f1020000000 rw-p 00000000 fd:01 1234                       /var/lib/wrenn/templates/base/memory
Size:             524288 kB
Pss:               20000 kB
55d000000000-55d000400000 r-xp 00100000 fd:01 99                         /usr/bin/qemu-system-x86_64
Size:               4096 kB
Pss:                 800 kB
55d100000000-55d108000000 rw-p 00000000 00:00 0                          [heap]
Size:             131072 kB
Pss:               30000 kB
VmFlags: rd wr mr mw me ac sd
";
        assert_eq!(translation_cache(smaps), (32764, 5000));
        assert_eq!(translation_cache(""), (0, 0));
    }
}
