//! Prints a small benchmark report (a subset of `bb bench`), for quick checks.
use bb_bench::*;
use bb_core::EdgeShape;

fn main() {
    let mut rows = refresh_rows(&[EdgeShape::dense(4096, 4096)], 5);
    rows.extend(observe_rows(10, (64, 256, 1024), (128, 4096)));
    rows.extend(sparse_rows(&[4096], &[0.5, 0.1], &[1, 16, 128], 5));
    println!("{}", markdown(&rows));
}
