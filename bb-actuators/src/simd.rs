//! Runtime dispatch of hot loops to AVX2 + FMA code.
//!
//! The default x86-64 target only guarantees SSE2. [`multiversion!`] compiles a function body
//! three times — for the baseline, with `avx2,fma` (and `popcnt`), and with AVX-512 — and picks the widest the
//! CPU supports at run time, so builds stay portable and still use the
//! wide vector units where they exist. The choice never changes results: the body is the same
//! code and Rust does not contract `a * b + c` into a fused multiply-add by itself.
//!
//! The one exception is asked for by name: `multiversion! { fused LANES; fn ... }` gives the
//! body a const `LANES` (16 with AVX-512, 8 with AVX2 + FMA, 0 on the baseline) so that it can
//! pick tile widths for the vector registers and use `f32::mul_add` where the CPU fuses it.
//! Such a function's results may differ in the last bits between CPUs (never between runs on
//! one machine); only compacted inference uses it, never training or the refresh.

/// Defines `fn name(args) -> ret { body }` compiled for the baseline and for AVX2 + FMA,
/// dispatching at run time. Arguments must be plain identifiers with concrete types.
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion {
    (fused $lanes:ident; $(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic<const $lanes: usize>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma,popcnt")]
                unsafe fn widest($($arg: $ty),*) $(-> $ret)? {
                    generic::<16>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,popcnt")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    generic::<8>($($arg),*)
                }
                let popcnt = std::is_x86_feature_detected!("popcnt");
                if popcnt && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: `widest` only needs the CPU features checked just above.
                    return unsafe { widest($($arg),*) };
                }
                if popcnt && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: `wide` only needs the CPU features checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            generic::<0>($($arg),*)
        }
    };
    // The plain form: the same dispatch, with a lane count the body does not look at.
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::multiversion! {
            fused _LANES;
            $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? $body
        }
    };
}

/// Asks the CPU to bring the cache lines of `data` into its nearest cache ahead of use (a
/// hint: no effect on results; nothing on targets without one).
#[inline(always)]
pub fn prefetch_near<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(data);
        let p = data.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: SSE is part of the x86-64 baseline; a prefetch reads nothing and the
            // address lies inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
