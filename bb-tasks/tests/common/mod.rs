//! Helpers shared by the real-data and sweep tests: tiny generated IDX data sets, so no test
//! needs the network or the real files.

#![allow(dead_code)]

use bb_tasks::realdata::encode_idx;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A fresh, empty temporary folder (removed when the returned guard drops).
#[derive(Debug)]
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        let d = Self::unmade(tag);
        std::fs::create_dir_all(&d.0).unwrap();
        d
    }

    /// A fresh path that does not exist yet (for commands that must make the folder
    /// themselves, or must not make it at all); removed, if made, when the guard drops.
    pub(crate) fn unmade(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "bb-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// 28x28 images of 10 classes: class `c` lights a 6x6 block at a class-specific place, plus
/// sparse noise, so a small MLP can learn them.
pub(crate) fn images(per_class: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u8> = (0..10u8)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    // interleave the classes
    for i in (1..order.len()).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    let mut x = Vec::with_capacity(order.len() * 784);
    for &c in &order {
        let (r0, c0) = (2 + (c as usize / 4) * 8, 2 + (c as usize % 4) * 6);
        for r in 0..28 {
            for col in 0..28 {
                let on = (r0..r0 + 6).contains(&r) && (c0..c0 + 6).contains(&col);
                let v = if on {
                    rng.gen_range(150..=255)
                } else if rng.gen_bool(0.03) {
                    rng.gen_range(0..=255)
                } else {
                    0
                };
                x.push(v as u8);
            }
        }
    }
    (x, order)
}

/// Writes the four IDX files of `set` (`mnist` raw, `fashion-mnist` gzip) under `dir/set/`.
pub(crate) fn write_image_set(
    dir: &Path,
    set: &str,
    train_per_class: usize,
    test_per_class: usize,
) {
    let base = dir.join(set);
    std::fs::create_dir_all(&base).unwrap();
    let (trx, try_) = images(train_per_class, 1);
    let (tex, tey) = images(test_per_class, 2);
    let files = [
        (
            "train-images-idx3-ubyte",
            encode_idx(&[try_.len(), 28, 28], &trx),
        ),
        ("train-labels-idx1-ubyte", encode_idx(&[try_.len()], &try_)),
        (
            "t10k-images-idx3-ubyte",
            encode_idx(&[tey.len(), 28, 28], &tex),
        ),
        ("t10k-labels-idx1-ubyte", encode_idx(&[tey.len()], &tey)),
    ];
    for (name, bytes) in files {
        if set == "mnist" {
            std::fs::write(base.join(name), bytes).unwrap();
        } else {
            std::fs::write(base.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        }
    }
}

/// A small Shuttle-like CSV: `n` rows, every `every`-th an anomaly with shifted features.
pub(crate) fn shuttle_csv(n: usize, every: usize) -> String {
    let mut s = String::from("f1,f2,f3,f4,f5,f6,f7,f8,f9,anomaly\n");
    for i in 0..n {
        let a = (i % every == 0) as i32;
        let vals: Vec<String> = (0..9)
            .map(|j| ((i * 7 + j * 13) % 50 + 30 * a as usize * (j % 2)).to_string())
            .collect();
        s.push_str(&format!("{},{a}\n", vals.join(",")));
    }
    s
}
