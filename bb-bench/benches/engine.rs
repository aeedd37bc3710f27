//! Criterion micro-benchmarks of the engine: refresh (SP-in / SP-out, regrow on and off,
//! balance with and without matched density), activity observation, and compacted versus
//! dense inference. Each group also times the streaming floor of its data, so ratios can be
//! read off one run. `bb bench` prints the same cases as a table of ratios.

use bb_bench::{dense_forward, random_row_mask, random_vec, refresh_pruner, stream_sum};
use bb_core::sparse::{CsrLayer, SparseScratch};
use bb_core::{Activations, EdgeShape, Pruner, PrunerConfig, Topology};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;

fn refresh(c: &mut Criterion) {
    let shapes = [
        EdgeShape::dense(1024, 1024),
        EdgeShape::dense(4096, 4096),
        EdgeShape::dense(4096, 16384),
        EdgeShape::conv(256, 256, &[3, 3]),
    ];
    let mut g = c.benchmark_group("refresh");
    g.sample_size(10);
    for shape in &shapes {
        let dims = format!(
            "{}x{}{}",
            shape.out,
            shape.inp,
            if shape.kernel.is_empty() { "" } else { "x3x3" }
        );
        let mut w = random_vec(7, shape.weight_len());
        g.bench_function(BenchmarkId::new("floor", &dims), |b| {
            b.iter(|| black_box(stream_sum(&w)))
        });
        for actuator in ["sp_in", "sp_out"] {
            for regrow in [true, false] {
                for matched in [true, false] {
                    let mut p = refresh_pruner(shape, actuator, regrow, matched);
                    let id = format!(
                        "{dims}/{actuator}/regrow={regrow}/{}",
                        if matched { "matched" } else { "d0" }
                    );
                    g.bench_function(BenchmarkId::new("balance", id), |b| {
                        b.iter(|| black_box(p.refresh(&mut [&mut w[..]], None).expect("refresh")))
                    });
                }
            }
        }
    }
    g.finish();
}

fn observe(c: &mut Criterion) {
    let mut g = c.benchmark_group("observe");
    for (name, b, u, pos) in [
        ("128x4096", 128, 4096, 1),
        ("conv 64x256x32x32", 64, 256, 1024),
    ] {
        let x = random_vec(3, b * u * pos);
        let topo = Topology::new()
            .population("in", 4)
            .population("h", u)
            .population("o", 2)
            .layer("a", "in", "h")
            .layer("b", "h", "o");
        let mut p = Pruner::new(
            PrunerConfig::from_toml_str("[policy]\nkind = \"dense\"\n").expect("config"),
            topo,
        )
        .expect("pruner");
        g.bench_function(BenchmarkId::new("floor", name), |bch| {
            bch.iter(|| black_box(stream_sum(&x)))
        });
        g.bench_function(BenchmarkId::new("ema_on_rate", name), |bch| {
            bch.iter(|| {
                p.observe("h", Activations::batch_major_positions(&x, b, u, pos))
                    .expect("observe")
            })
        });
    }
    g.finish();
}

fn sparse(c: &mut Criterion) {
    let mut g = c.benchmark_group("sparse_inference");
    g.sample_size(10);
    for n in [1024usize, 4096] {
        let w = random_vec(5, n * n);
        for d in [0.5, 0.3, 0.1, 0.05] {
            let mask = random_row_mask(n, n, d, 9);
            let mut masked = w.clone();
            bb_actuators::zero_dead(&EdgeShape::dense(n, n), &mask, &mut masked).expect("mask");
            let csr = CsrLayer::from_masked(&masked, &mask, None, None).expect("csr");
            for batch in [1usize, 16, 128] {
                let x = random_vec(6, batch * n);
                let mut y = vec![0.0f32; batch * n];
                let mut scratch = SparseScratch::default();
                let id = format!("{n}x{n}/d={d}/b={batch}");
                g.bench_function(BenchmarkId::new("csr", &id), |b| {
                    b.iter(|| {
                        csr.forward(&x, batch, &mut y, &mut scratch)
                            .expect("forward")
                    })
                });
                if d == 0.5 {
                    g.bench_function(
                        BenchmarkId::new("dense", format!("{n}x{n}/b={batch}")),
                        |b| b.iter(|| dense_forward(&masked, n, n, &x, batch, &mut y)),
                    );
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, refresh, observe, sparse);
criterion_main!(benches);
