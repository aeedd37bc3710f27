//! The floating-point environment of the `bb` program: subnormal numbers are flushed to zero.
//!
//! Why: with BB, the gradients of dead edges are zeroed, so their Adam first moments decay by
//! `beta1 = 0.9` every step. A few hundred steps later they fall below `f32::MIN_POSITIVE`
//! into the subnormal range, and since `0.9 * 2^-149` rounds back to `2^-149`, they stay
//! there for the rest of the run. On x86 an arithmetic operation on a subnormal can cost a
//! microcode assist (around a hundred cycles), and a pruned network has such moments on most
//! of its edges, every step.
//!
//! What: on x86_64, [`flush_subnormals`] sets the MXCSR flags FTZ (results that would be
//! subnormal become zero) and DAZ (subnormal inputs read as zero) for the calling thread;
//! threads it starts later inherit them, and [`flush_subnormals_everywhere`] sets them on
//! every rayon worker as well. Other architectures are left as they are.
//!
//! Effect on results: only values below `1.2e-38` in magnitude change (they become 0), which
//! moves no weight of a trained network. Runs of the `bb` program are still deterministic
//! and resume bit-exactly; library code (and its tests) runs with the default environment
//! unless it calls these functions.

/// MXCSR bit 15: flush-to-zero.
#[cfg(target_arch = "x86_64")]
const FTZ: u32 = 1 << 15;
/// MXCSR bit 6: denormals-are-zero.
#[cfg(target_arch = "x86_64")]
const DAZ: u32 = 1 << 6;

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr = 0u32;
    // SAFETY: stmxcsr stores the 32-bit MXCSR register to the given, writable address.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
    }
    csr
}

#[cfg(target_arch = "x86_64")]
fn set_mxcsr(csr: u32) {
    // SAFETY: ldmxcsr loads MXCSR from the given address; the value differs from the current
    // one only in the FTZ and DAZ bits, which every x86_64 CPU supports.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
    }
}

/// Flushes subnormal results and inputs to zero in the calling thread (and in the threads
/// it starts afterwards). Returns whether this architecture supports it.
pub fn flush_subnormals() -> bool {
    set_flush_subnormals(true)
}

/// Turns flushing on or off in the calling thread. Returns whether this architecture
/// supports it (if not, nothing changes).
pub fn set_flush_subnormals(on: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let csr = mxcsr();
        set_mxcsr(if on {
            csr | FTZ | DAZ
        } else {
            csr & !(FTZ | DAZ)
        });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = on;
        false
    }
}

/// Whether subnormals are flushed in the calling thread.
pub fn flushing_subnormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        mxcsr() & (FTZ | DAZ) == FTZ | DAZ
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Flushes subnormals in the calling thread and on every worker of the current rayon pool
/// (the global one, created if needed, unless called inside `ThreadPool::install`). Call it
/// first thing in `main`. Returns whether this architecture supports it.
pub fn flush_subnormals_everywhere() -> bool {
    let supported = flush_subnormals();
    rayon::broadcast(|_| {
        flush_subnormals();
    });
    supported
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    #[test]
    fn flushing_turns_subnormal_results_and_inputs_into_zero_and_back() {
        // a fresh thread, so the test harness's threads keep their environment
        std::thread::spawn(|| {
            let tiny = black_box(f32::MIN_POSITIVE);
            let sub = black_box(f32::from_bits(1)); // 2^-149
            assert!(!flushing_subnormals());
            assert_eq!(black_box(tiny * 0.5), f32::MIN_POSITIVE / 2.0);
            assert_eq!(black_box(sub + 0.0), sub);
            // Adam's first moment of a dead edge never leaves the smallest subnormal
            assert_eq!(black_box(0.9f32) * sub + 0.1 * 0.0, sub);
            if !flush_subnormals() {
                return; // not x86_64: nothing to check
            }
            assert!(flushing_subnormals());
            assert_eq!(black_box(tiny * 0.5), 0.0, "FTZ");
            assert_eq!(black_box(sub + 0.0), 0.0, "DAZ");
            assert_eq!(black_box(tiny * 1.0), tiny, "normal numbers are untouched");
            // threads started now inherit the setting
            let inner =
                std::thread::spawn(|| (flushing_subnormals(), black_box(f32::MIN_POSITIVE) * 0.5));
            assert_eq!(inner.join().unwrap(), (true, 0.0));
            set_flush_subnormals(false);
            assert!(!flushing_subnormals());
            assert_eq!(black_box(tiny * 0.5), f32::MIN_POSITIVE / 2.0);
            // a pool started from a thread that does not flush does not flush either,
            // until `flush_subnormals_everywhere` runs in it
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            assert_eq!(
                pool.broadcast(|_| flushing_subnormals()),
                vec![false, false]
            );
            pool.install(flush_subnormals_everywhere);
            assert_eq!(pool.broadcast(|_| flushing_subnormals()), vec![true, true]);
            assert!(
                !flushing_subnormals(),
                "`install` ran it on a worker, not here"
            );
        })
        .join()
        .unwrap();
    }
}
