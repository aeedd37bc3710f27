//! The engine's per-training-step hot path allocates nothing: observing activations,
//! counting a step that is not a refresh, and masking weights and gradients. A counting
//! global allocator makes this a test rather than a claim. It counts per thread, so the
//! test harness's own threads cannot disturb the count.

use bb_core::{Activations, Pruner, PrunerConfig, Topology};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> usize {
    ALLOCS.with(Cell::get)
}

// SAFETY: defers every call to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn training_steps_between_refreshes_do_not_allocate() {
    steps_do_not_allocate([64, 48, 32, 10], 50);
}

/// A layer large enough (over 2^15 edges) for the engine to split its mask application over
/// threads: still nothing allocated on the calling thread.
#[test]
fn training_steps_with_a_large_layer_do_not_allocate() {
    steps_do_not_allocate([64, 700, 64, 10], 300);
}

fn steps_do_not_allocate(widths: [usize; 4], steps: usize) {
    let topo = Topology::chain(&["a", "b", "c"], &widths).unwrap();
    let cfg = PrunerConfig::from_toml_str(
        "[schedule]\nwarmup_steps = 5\nrefresh_every = 1000\n[policy]\nkind = \"balance\"\nbeta = 0.1\ntarget_density = 0.5\n",
    )
    .unwrap();
    let mut p = Pruner::new(cfg, topo).unwrap();
    let mut ws: Vec<Vec<f32>> = widths
        .windows(2)
        .map(|w| vec![0.1f32; w[0] * w[1]])
        .collect();
    let mut gs = ws.clone();
    let acts: Vec<Vec<f32>> = widths
        .iter()
        .map(|&u| (0..16 * u).map(|i| (i % 7) as f32 - 3.0).collect())
        .collect();
    let one_step = |p: &mut Pruner, ws: &mut Vec<Vec<f32>>, gs: &mut Vec<Vec<f32>>| {
        for (name, (a, &u)) in ["a", "b"].iter().zip(acts[1..].iter().zip(&widths[1..])) {
            p.observe(name, Activations::batch_major(a, 16, u)).unwrap();
        }
        for l in 0..3 {
            p.mask_gradients(l, &mut gs[l]).unwrap();
            p.apply_mask(l, &mut ws[l]).unwrap();
        }
        let mut refs: [&mut [f32]; 3] = {
            let (x, rest) = ws.split_at_mut(1);
            let (y, z) = rest.split_at_mut(1);
            [&mut x[0][..], &mut y[0][..], &mut z[0][..]]
        };
        p.step(&mut refs, None).unwrap()
    };
    // Warm up past the first refresh, so scratch buffers exist.
    for _ in 0..6 {
        one_step(&mut p, &mut ws, &mut gs);
    }
    assert!(p.density() < 0.6, "the first refresh has pruned");
    assert!(
        allocations() > 0,
        "the counter sees this thread's allocations"
    );
    let before = allocations();
    for _ in 0..steps {
        assert!(one_step(&mut p, &mut ws, &mut gs).is_none());
    }
    let after = allocations();
    assert_eq!(after - before, 0, "allocations in {steps} training steps");
}
