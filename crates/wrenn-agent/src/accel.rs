//! Accelerator choice: KVM only where it can really run guests, TCG otherwise.
//!
//! `/dev/kvm` opening is not enough: on nested PVM hosts `KVM_CREATE_VM` succeeds but a stock
//! kernel hangs. The CPU flags (`vmx`/`svm`) tell the two apart, so KVM needs both.
//!
//! The operator chooses with an [`AccelChoice`] (`wrenn up --accel auto|kvm|tcg`): `auto`
//! takes KVM where it can run guests and falls back to TCG, `kvm` fails (saying why) where it
//! cannot, `tcg` forces TCG. The difference matters for security: QEMU does not treat TCG as
//! a security boundary (its security policy covers hardware virtualization only), so a guest
//! under TCG is not isolated the way a KVM guest is; [`TCG_WARNING`] is what `wrenn up` says.

use std::fmt;

/// The environment variable that forces a choice: `auto`, `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "WRENN_ACCEL";

/// What `wrenn up` says when its guests run under TCG.
pub const TCG_WARNING: &str = "Guests run under TCG (software emulation). QEMU does not treat \
     TCG as a security boundary: a guest under TCG is not isolated from the host the way a KVM \
     guest is. Run untrusted code only with KVM (--accel kvm).";

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software translator.
    Tcg,
}

/// How the operator asks for an accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM where it can run guests, else TCG.
    #[default]
    Auto,
    /// KVM, or an error saying why it cannot run guests here.
    Kvm,
    /// TCG, even where KVM works.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = AccelError;

    fn from_str(v: &str) -> Result<Self, AccelError> {
        match v.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(AccelError::Unknown(v.to_owned())),
        }
    }
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// Why no accelerator was chosen.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// Not `auto`, `kvm` or `tcg`.
    #[error("accelerator {0:?} is none of auto, kvm, tcg")]
    Unknown(String),
    /// KVM was asked for and cannot run guests here.
    #[error("KVM was asked for (--accel kvm) but cannot run guests on this host: {0}")]
    KvmUnavailable(String),
}

impl Accel {
    /// Picks the accelerator: `WRENN_ACCEL` (`auto`, `kvm`, `tcg`) if set, else `auto`.
    pub fn detect() -> Result<Self, AccelError> {
        let choice = match std::env::var(ACCEL_ENV) {
            Ok(v) => v.parse()?,
            Err(_) => AccelChoice::Auto,
        };
        Self::choose(choice)
    }

    /// The accelerator `choice` means on this host (see [`AccelChoice`]).
    pub fn choose(choice: AccelChoice) -> Result<Self, AccelError> {
        if choice == AccelChoice::Tcg {
            return Ok(Self::Tcg);
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop);
        decide(choice, cpu_has_virt(&cpuinfo), kvm)
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

/// The choice, given whether the CPU advertises hardware virtualization and whether
/// `/dev/kvm` opened.
fn decide(
    choice: AccelChoice,
    cpu_virt: bool,
    kvm_opens: std::io::Result<()>,
) -> Result<Accel, AccelError> {
    let kvm = match (cpu_virt, kvm_opens) {
        (true, Ok(())) => Ok(()),
        (_, Err(e)) => Err(format!("/dev/kvm cannot be opened: {e}")),
        (false, Ok(())) => Err("/dev/kvm opens, but the CPU advertises no vmx/svm (nested \
             virtualization without hardware support, where a guest kernel hangs)"
            .to_owned()),
    };
    match (choice, kvm) {
        (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
        (_, Ok(())) => Ok(Accel::Kvm),
        (AccelChoice::Auto, Err(_)) => Ok(Accel::Tcg),
        (AccelChoice::Kvm, Err(why)) => Err(AccelError::KvmUnavailable(why)),
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
    fn parses_the_choice() {
        assert_eq!("KVM".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert_eq!(" auto ".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        let e = "hvf".parse::<AccelChoice>().unwrap_err().to_string();
        assert!(e.contains("\"hvf\"") && e.contains("auto, kvm, tcg"), "{e}");
    }

    fn opens() -> std::io::Result<()> {
        Ok(())
    }

    fn fails(kind: std::io::ErrorKind) -> std::io::Result<()> {
        Err(std::io::Error::from(kind))
    }

    #[test]
    fn chooses_per_what_the_host_can_do() {
        use AccelChoice::{Auto, Kvm, Tcg};
        use std::io::ErrorKind::{NotFound, PermissionDenied};
        // KVM can run guests.
        assert_eq!(decide(Auto, true, opens()).unwrap(), Accel::Kvm);
        assert_eq!(decide(Kvm, true, opens()).unwrap(), Accel::Kvm);
        assert_eq!(decide(Tcg, true, opens()).unwrap(), Accel::Tcg);
        // It cannot: auto falls back, kvm says why, tcg does not care.
        type Probe = fn() -> std::io::Result<()>;
        let cases: [(bool, Probe, &str); 3] = [
            (false, opens, "no vmx/svm"),
            (
                true,
                || fails(PermissionDenied),
                "/dev/kvm cannot be opened",
            ),
            (false, || fails(NotFound), "/dev/kvm cannot be opened"),
        ];
        for (virt, kvm, why) in cases {
            assert_eq!(decide(Auto, virt, kvm()).unwrap(), Accel::Tcg);
            assert_eq!(decide(Tcg, virt, kvm()).unwrap(), Accel::Tcg);
            let e = decide(Kvm, virt, kvm()).unwrap_err().to_string();
            assert!(e.contains("--accel kvm") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn picks_tcg_on_this_kind_of_host() {
        // Our dev and CI machines have /dev/kvm but no vmx/svm: they must get TCG, and an
        // explicit kvm must fail there.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if !cpu_has_virt(&cpuinfo) {
            assert_eq!(Accel::choose(AccelChoice::Auto).unwrap(), Accel::Tcg);
            assert!(Accel::choose(AccelChoice::Kvm).is_err());
        }
        assert_eq!(Accel::choose(AccelChoice::Tcg).unwrap(), Accel::Tcg);
    }
}
