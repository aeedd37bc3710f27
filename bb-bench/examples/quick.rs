//! Prints a subset of the `bb bench` cases, for quick checks: `quick [refresh|observe|sparse]...`
use bb_bench::*;
use bb_core::EdgeShape;

fn main() {
    let want: Vec<String> = std::env::args().skip(1).collect();
    let on = |s: &str| want.is_empty() || want.iter().any(|w| w == s);
    let mut rows = Vec::new();
    if on("refresh") {
        rows.extend(refresh_rows(&[EdgeShape::dense(4096, 4096)], 5));
    }
    if on("observe") {
        rows.extend(observe_rows(10, (64, 256, 1024), (128, 4096)));
    }
    if on("sparse") {
        rows.extend(sparse_rows(&[4096], &[0.5, 0.1], &[1, 16, 128], 5));
    }
    println!("{}", markdown(&rows));
}
