//! `bb mask` end to end on small `.npy` files: dense and 4-D conv weights, SP-in and SP-out,
//! an initial mask, and bad input that must fail without writing anything.

mod common;

use common::TempDir;
use ndarray::{Array1, ArrayD, IxDyn};
use ndarray_npy::{read_npy, write_npy};
use std::path::Path;
use std::process::Command;

fn bb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bb"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Deterministic pseudo-random weights without ties.
fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5) * 2.0)
        .collect()
}

fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut t: Vec<usize> = idx.into_iter().take(k).collect();
    t.sort_unstable();
    t
}

#[test]
fn mask_sp_in_on_a_conv_weight() {
    let tmp = TempDir::new("mask-conv");
    let d = tmp.path();
    let (o, i, kh, kw) = (6usize, 5usize, 3usize, 3usize);
    let w = weights(o * i * kh * kw);
    write_npy(
        d.join("W.npy"),
        &ArrayD::from_shape_vec(IxDyn(&[o, i, kh, kw]), w.clone()).unwrap(),
    )
    .unwrap();
    let a: Vec<f64> = vec![0.05, 0.2, 0.5, 0.5, 0.8, 0.95];
    write_npy(d.join("A.npy"), &Array1::from(a.clone())).unwrap();
    let (beta, d0) = (1.0f64, 2.0f64);
    std::fs::write(
        d.join("cfg.toml"),
        format!("[policy]\nkind = \"balance\"\nbeta = {beta}\nd0 = {d0}\n[actuator]\nkind = \"sp_in\"\n"),
    )
    .unwrap();
    let out = bb(&[
        "mask",
        "--weights",
        s(&d.join("W.npy")),
        "--activity",
        s(&d.join("A.npy")),
        "--config",
        s(&d.join("cfg.toml")),
        "--out",
        s(&d.join("M.npy")),
        "--scale-out",
        s(&d.join("S.npy")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: ArrayD<u8> = read_npy(d.join("M.npy")).unwrap();
    assert_eq!(m.shape(), &[o, i]);
    let sc: ArrayD<f32> = read_npy(d.join("S.npy")).unwrap();
    let kl = kh * kw;
    for r in 0..o {
        let ac = a[r].clamp(1e-4, 1.0 - 1e-4);
        let k = (d0 + ((1.0 - ac) / ac).ln() / beta)
            .round()
            .clamp(1.0, i as f64) as usize;
        let scores: Vec<f32> = (0..i)
            .map(|c| {
                w[(r * i + c) * kl..(r * i + c + 1) * kl]
                    .iter()
                    .map(|x| x.abs())
                    .sum()
            })
            .collect();
        let live: Vec<usize> = (0..i).filter(|&c| m[[r, c]] == 1).collect();
        assert_eq!(live, top_k(&scores, k), "row {r}");
        assert!((sc[[r]] - (i as f32 / k as f32).sqrt()).abs() < 1e-6);
    }
}

#[test]
fn mask_sp_out_with_initial_mask_and_matched_density() {
    let tmp = TempDir::new("mask-spout");
    let d = tmp.path();
    let (o, i) = (8usize, 10usize);
    let w = weights(o * i);
    write_npy(
        d.join("W.npy"),
        &ArrayD::from_shape_vec(IxDyn(&[o, i]), w.iter().map(|&x| x as f64).collect()).unwrap(),
    )
    .unwrap();
    write_npy(
        d.join("A.npy"),
        &Array1::from((0..i).map(|j| j as f32 / 10.0 + 0.03).collect::<Vec<f32>>()),
    )
    .unwrap();
    let mut m0 = vec![1u8; o * i];
    m0[3] = 0;
    m0[17] = 0;
    write_npy(
        d.join("M0.npy"),
        &ArrayD::from_shape_vec(IxDyn(&[o, i]), m0).unwrap(),
    )
    .unwrap();
    std::fs::write(
        d.join("cfg.toml"),
        "[policy]\nkind = \"balance\"\nbeta = 0.5\ntarget_density = 0.45\n[actuator]\nkind = \"sp_out\"\nregrow = false\n",
    )
    .unwrap();
    let out = bb(&[
        "mask",
        "--weights",
        s(&d.join("W.npy")),
        "--activity",
        s(&d.join("A.npy")),
        "--config",
        s(&d.join("cfg.toml")),
        "--out",
        s(&d.join("M.npy")),
        "--mask",
        s(&d.join("M0.npy")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: ArrayD<u8> = read_npy(d.join("M.npy")).unwrap();
    assert_eq!(m.iter().map(|&x| x as usize).sum::<usize>(), 36); // round(0.45 * 80)
    assert_eq!(m[[0, 3]], 0, "prune-only keeps dead edges dead");
    assert_eq!(m[[1, 7]], 0);
    // Busier input units (higher activity) keep fewer outgoing edges.
    let fan_out: Vec<usize> = (0..i)
        .map(|c| (0..o).filter(|&r| m[[r, c]] == 1).count())
        .collect();
    assert!(fan_out.windows(2).all(|p| p[0] >= p[1]), "{fan_out:?}");
    assert!(fan_out[0] > fan_out[i - 1], "{fan_out:?}");
}

#[test]
fn bad_inputs_fail_and_write_nothing() {
    let tmp = TempDir::new("mask-bad");
    let d = tmp.path();
    write_npy(
        d.join("W.npy"),
        &ArrayD::from_shape_vec(IxDyn(&[4, 3]), weights(12)).unwrap(),
    )
    .unwrap();
    write_npy(d.join("A5.npy"), &Array1::from(vec![0.5f64; 5])).unwrap();
    write_npy(d.join("A4.npy"), &Array1::from(vec![0.5f64; 4])).unwrap();
    std::fs::write(
        d.join("good.toml"),
        "[policy]\nkind = \"balance\"\nbeta = 1.0\nd0 = 1.0\n",
    )
    .unwrap();
    std::fs::write(
        d.join("beta.toml"),
        "[policy]\nkind = \"balance\"\nbeta = -1.0\nd0 = 1.0\n",
    )
    .unwrap();
    std::fs::write(d.join("kind.toml"), "[policy]\nkind = \"balanse\"\n").unwrap();
    std::fs::write(d.join("garbage.npy"), "not an npy file").unwrap();
    let cases: [(&str, &str, &str, &str); 5] = [
        ("W.npy", "A5.npy", "good.toml", "A5.npy"),
        ("W.npy", "A4.npy", "beta.toml", "policy.beta"),
        ("W.npy", "A4.npy", "kind.toml", "balance"),
        ("garbage.npy", "A4.npy", "good.toml", "garbage.npy"),
        ("missing.npy", "A4.npy", "good.toml", "missing.npy"),
    ];
    for (w, a, c, needle) in cases {
        let out = bb(&[
            "mask",
            "--weights",
            s(&d.join(w)),
            "--activity",
            s(&d.join(a)),
            "--config",
            s(&d.join(c)),
            "--out",
            s(&d.join("M.npy")),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{w} {a} {c} should fail");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!d.join("M.npy").exists(), "nothing may be written on error");
    }
}
