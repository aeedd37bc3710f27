//! Where the `bb` program's work runs: on a thread of rayon's global pool.
//!
//! Why: every parallel call of a training step (the matmuls, the optimizer's chunks, a
//! refresh, the observation beside the backward pass) made from a thread outside the pool
//! hands its job to the pool and sleeps until a worker has finished it: a wake-up on both
//! sides per call, a dozen calls per step, and the waiting thread shares the cores with the
//! workers. Made from a worker, the same call runs its first part in place and the other
//! worker steals the rest. On the 2-core build machine a dense step of the 784-300-100-10 MLP
//! (batch 128, Adam) took 1.84-2.23 ms so against 2.45-2.89 ms from the main thread (four
//! alternating runs each of `step_profile small dense 1000 30 flush pool|main`).
//!
//! Results do not change: the work is split by the pool's thread count either way
//! (`step_profile` prints the same parameter hash from both places).

/// Runs `f` on a thread of rayon's global pool (in place when the caller already is one) and
/// returns its result; the calling thread waits.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `rayon::scope` runs its closure on a worker of the global pool (unlike
    // `in_place_scope`, which stays on the calling thread).
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_worker_and_returns_the_result() {
        assert_eq!(rayon::current_thread_index(), None);
        let (inside, v) = on_pool(|| (rayon::current_thread_index(), 6 * 7));
        assert!(inside.is_some(), "not run on a pool thread");
        assert_eq!(v, 42);
        // nested: stays on the same worker
        let (outer, inner) = on_pool(|| {
            let t = rayon::current_thread_index();
            (t, on_pool(rayon::current_thread_index))
        });
        assert_eq!(outer, inner);
    }
}
