//! Which instruction set the hot paths use: detected once at start-up, forceable with
//! `LETHE_KERNELS`, and never one the CPU lacks.
//!
//! Every hot path has one implementation per [`Isa`] behind one interface (the row helpers in
//! [`crate::simd`], the kernel table in [`crate::model::kernels`]). The portable one is the
//! correctness reference: tests run every ISA the machine supports against it.

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level the kernels are written for, best first in [`Isa::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// x86-64 AVX-512 F/BW/DQ with VNNI (`vpdpbusd` on 512-bit registers), FMA and F16C.
    Avx512,
    /// x86-64 AVX2 + FMA + F16C with AVX-VNNI (`vpdpbusd` on 256-bit registers; Intel since
    /// Alder Lake / Sapphire Rapids, AMD since Zen 5 alongside AVX-512).
    Avx2Vnni,
    /// x86-64 AVX2 + FMA + F16C (`vpmaddubsw`/`vpmaddwd` integer dot products; AMD Zen 2/3,
    /// Intel Haswell to Comet Lake).
    Avx2,
    /// aarch64 NEON with the dot-product extension (`sdot`; Armv8.2+: Graviton 2+, Ampere,
    /// Apple M1+).
    NeonDot,
    /// aarch64 NEON (every 64-bit ARM CPU).
    Neon,
    /// Portable Rust, vectorised by the compiler as far as the build target allows; the
    /// reference every other path is tested against.
    Portable,
}

/// Why a requested instruction set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsaError {
    #[error("LETHE_KERNELS={0:?} is not a kernel set (choose one of: {list})", list = Isa::names())]
    Unknown(String),
    #[error(
        "LETHE_KERNELS={name}: this CPU lacks {missing}, so the {name} kernels cannot run here (this CPU supports: {supported})",
        name = .isa.name(),
        supported = Isa::supported_names()
    )]
    Unsupported { isa: Isa, missing: String },
}

impl Isa {
    /// Every kernel set, best first.
    pub const ALL: [Isa; 6] = [Isa::Avx512, Isa::Avx2Vnni, Isa::Avx2, Isa::NeonDot, Isa::Neon, Isa::Portable];

    /// The name used by `LETHE_KERNELS`, bench output and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Vnni => "avx2-vnni",
            Isa::Avx2 => "avx2",
            Isa::NeonDot => "neon-dotprod",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    fn names() -> String {
        Isa::ALL.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    }

    fn supported_names() -> String {
        Isa::supported().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    }

    /// CPU features this kernel set needs, as the OS names them (`/proc/cpuinfo` flags).
    fn required_features(self) -> &'static [&'static str] {
        match self {
            Isa::Avx512 => &["avx512f", "avx512bw", "avx512dq", "avx512vnni", "fma", "f16c"],
            Isa::Avx2Vnni => &["avx2", "fma", "f16c", "avxvnni"],
            Isa::Avx2 => &["avx2", "fma", "f16c"],
            Isa::NeonDot => &["neon", "dotprod"],
            Isa::Neon => &["neon"],
            Isa::Portable => &[],
        }
    }

    /// The required features this CPU lacks (empty: the kernels can run).
    pub fn missing_features(self) -> Vec<&'static str> {
        self.required_features().iter().copied().filter(|f| !cpu_has(f)).collect()
    }

    /// Whether this CPU can run the kernel set (detected once, then a bit test).
    pub fn is_supported(self) -> bool {
        static MASK: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        let mask = *MASK.get_or_init(|| {
            Isa::ALL.iter().filter(|i| i.missing_features().is_empty()).fold(0, |m, i| m | 1 << i.code())
        });
        mask & (1 << self.code()) != 0
    }

    /// Every kernel set this CPU can run, best first (always ends with [`Isa::Portable`]).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best kernel set for this CPU.
    pub fn best() -> Isa {
        Isa::ALL.into_iter().find(|i| i.is_supported()).unwrap_or(Isa::Portable)
    }

    /// The kernel set for a `LETHE_KERNELS` value (`auto` or empty: the best one), checked
    /// against this CPU.
    pub fn select(requested: &str) -> Result<Isa, IsaError> {
        let requested = requested.trim();
        if requested.is_empty() || requested == "auto" {
            return Ok(Isa::best());
        }
        let isa = match requested {
            // Aliases: the usual spellings of the same sets.
            "avx512vnni" | "avx512-vnni" => Isa::Avx512,
            "avxvnni" | "avx-vnni" => Isa::Avx2Vnni,
            "dotprod" | "neon-dot" => Isa::NeonDot,
            name => Isa::ALL.into_iter().find(|i| i.name() == name).ok_or_else(|| IsaError::Unknown(name.into()))?,
        };
        let missing = isa.missing_features();
        if missing.is_empty() { Ok(isa) } else { Err(IsaError::Unsupported { isa, missing: missing.join(", ") }) }
    }

    /// The kernel set the environment asks for: `LETHE_KERNELS`, or the legacy
    /// `LETHE_PORTABLE_KERNELS=1`; the best one otherwise.
    pub fn from_env() -> Result<Isa, IsaError> {
        match std::env::var("LETHE_KERNELS") {
            Ok(v) => Isa::select(&v),
            Err(_) if std::env::var("LETHE_PORTABLE_KERNELS").is_ok_and(|v| v == "1") => Ok(Isa::Portable),
            Err(_) => Ok(Isa::best()),
        }
    }

    /// The CPU features relevant to the kernels that this CPU has, e.g. `avx2 fma f16c avxvnni`.
    pub fn cpu_features() -> String {
        const ALL: [&str; 11] = [
            "avx512f",
            "avx512bw",
            "avx512dq",
            "avx512vnni",
            "avx2",
            "fma",
            "f16c",
            "avxvnni",
            "neon",
            "dotprod",
            "i8mm",
        ];
        ALL.iter().copied().filter(|f| cpu_has(f)).collect::<Vec<_>>().join(" ")
    }

    fn code(self) -> u8 {
        Isa::ALL.iter().position(|&i| i == self).expect("listed") as u8 + 1
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = IsaError;
    fn from_str(s: &str) -> Result<Self, IsaError> {
        Isa::select(s)
    }
}

/// Runtime CPU feature detection (cached by std).
fn cpu_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx512bw" => is_x86_feature_detected!("avx512bw"),
            "avx512dq" => is_x86_feature_detected!("avx512dq"),
            "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            "f16c" => is_x86_feature_detected!("f16c"),
            "avxvnni" => is_x86_feature_detected!("avxvnni"),
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        match feature {
            "neon" => std::arch::is_aarch64_feature_detected!("neon"),
            "dotprod" => std::arch::is_aarch64_feature_detected!("dotprod"),
            "i8mm" => std::arch::is_aarch64_feature_detected!("i8mm"),
            _ => false,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        false
    }
}

/// The process-wide kernel set; 0 until chosen.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Chooses the process-wide kernel set from the environment (`LETHE_KERNELS`). Call it at
/// start-up so that a request the CPU cannot honour stops the program with a clear error
/// instead of surfacing later; a no-op if a set is already active.
pub fn init_from_env() -> Result<Isa, IsaError> {
    if let Some(isa) = current() {
        return Ok(isa);
    }
    let isa = Isa::from_env()?;
    activate(isa)?;
    Ok(active())
}

/// Makes `isa` the process-wide kernel set (start-up, and benchmarks comparing sets one after
/// the other). Refused if the CPU cannot run it.
pub fn activate(isa: Isa) -> Result<(), IsaError> {
    let missing = isa.missing_features();
    if !missing.is_empty() {
        return Err(IsaError::Unsupported { isa, missing: missing.join(", ") });
    }
    ACTIVE.store(isa.code(), Ordering::Release);
    Ok(())
}

fn current() -> Option<Isa> {
    match ACTIVE.load(Ordering::Acquire) {
        0 => None,
        c => Some(Isa::ALL[c as usize - 1]),
    }
}

/// The process-wide kernel set. Chosen from the environment on first use if start-up did not
/// choose it; an impossible `LETHE_KERNELS` then panics with the same message
/// [`init_from_env`] returns (programs call that first, so only tests and embedders see this).
pub fn active() -> Isa {
    match current() {
        Some(isa) => isa,
        None => match init_from_env() {
            Ok(isa) => isa,
            Err(e) => panic!("{e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_always_runs() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().ok().is_some(), isa.is_supported(), "{isa}");
        }
        assert_eq!(Isa::select("portable"), Ok(Isa::Portable));
        assert_eq!(Isa::select("auto"), Ok(Isa::best()));
        assert_eq!(*Isa::supported().last().unwrap(), Isa::Portable);
        assert_eq!(Isa::supported()[0], Isa::best());
    }

    #[test]
    fn an_isa_the_cpu_lacks_is_refused_with_what_is_missing() {
        // aarch64 sets on x86 and the reverse: always one the CPU lacks.
        let foreign = if cfg!(target_arch = "x86_64") { Isa::Neon } else { Isa::Avx2 };
        let e = Isa::select(foreign.name()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(foreign.name()) && msg.contains("lacks") && msg.contains("portable"), "{msg}");
        assert!(activate(foreign).is_err());
        let e = Isa::select("sse9").unwrap_err();
        assert!(e.to_string().contains("avx2") && e.to_string().contains("sse9"), "{e}");
    }
}
