//! Accelerator choice: KVM only where it can really run guests, TCG otherwise.
//!
//! `/dev/kvm` opening is not enough: on nested PVM hosts `KVM_CREATE_VM` succeeds but a stock
//! kernel hangs. The CPU flags (`vmx`/`svm`) tell the two apart, so KVM needs both.

use std::fmt;

/// The environment variable that forces a choice: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "WRENN_ACCEL";

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software translator.
    Tcg,
}

/// A bad `WRENN_ACCEL` value.
#[derive(Debug, thiserror::Error)]
#[error("{ACCEL_ENV}={0:?} is neither kvm nor tcg")]
pub struct AccelError(String);

impl Accel {
    /// Picks the accelerator: `WRENN_ACCEL` if set, else KVM when the CPU advertises
    /// `vmx`/`svm` and `/dev/kvm` opens, else TCG.
    pub fn detect() -> Result<Self, AccelError> {
        match std::env::var(ACCEL_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v),
            _ => Ok(Self::probe()),
        }
    }

    fn parse(v: &str) -> Result<Self, AccelError> {
        match v.to_ascii_lowercase().as_str() {
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(AccelError(v.to_owned())),
        }
    }

    fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if cpu_has_virt(&cpuinfo) && kvm_opens {
            Self::Kvm
        } else {
            Self::Tcg
        }
    }

    /// QEMU arguments selecting this accelerator (and a CPU model that restores anywhere the
    /// same accelerator runs).
    pub fn qemu_args(self) -> Vec<String> {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"].map(String::from).to_vec(),
            // A small translation cache: it dominates a TCG guest's private memory.
            Self::Tcg => ["-accel", "tcg,tb-size=32"].map(String::from).to_vec(),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// Whether any `flags` line of `/proc/cpuinfo` lists `vmx` or `svm`.
fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_matched_as_words() {
        assert!(cpu_has_virt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virt("flags : svm lm\n"));
        assert!(!cpu_has_virt("flags : fpu vmxnope hypervisor\nvmx: yes\n"));
    }

    #[test]
    fn parses_the_override() {
        assert_eq!(Accel::parse("KVM").unwrap(), Accel::Kvm);
        assert_eq!(Accel::parse("tcg").unwrap(), Accel::Tcg);
        assert!(Accel::parse("hvf").is_err());
    }

    #[test]
    fn picks_tcg_on_this_kind_of_host() {
        // Our dev and CI machines have /dev/kvm but no vmx/svm: they must get TCG.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpu_has_virt(&cpuinfo) {
            assert_eq!(Accel::probe(), Accel::Tcg);
        }
    }
}
