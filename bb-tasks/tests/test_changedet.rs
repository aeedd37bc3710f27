//! The change-detection stand-in: the pair generator's masks, the metrics, the Siamese
//! network's shared-weight gradients, and the experiment end to end on synthetic objects.

mod common;

use bb_tasks::changedet::{
    change_metrics, generate, most_found, objects, ChangeDetConfig, Counts, Pairs, SiamNet,
};
use bb_tasks::cli_conv::{run_in, CONV_PRESETS};
use bb_tasks::convkit::{ops, to_channel_major, Ctx, ParamStore};
use common::TempDir;
use dfdx::prelude::*;

/// The preset shrunk to synthetic 16x16 pairs, one seed and a few steps.
fn tiny(extra_data: &str) -> String {
    let preset = CONV_PRESETS.iter().find(|p| p.name == "changedet").unwrap();
    let mut t: toml::Table = toml::from_str(preset.toml).unwrap();
    t.insert("name".into(), "changedet-tiny".into());
    t.insert("seeds".into(), toml::Value::Array(vec![0.into()]));
    let mut data: toml::Table = toml::from_str(
        "source = \"synthetic\"\nsize = 16\nobject_size = 5\nn_train = 48\nn_test = 16\n\
         eval_pairs = 8\neval_subset = 4\n",
    )
    .unwrap();
    let extra: toml::Table = toml::from_str(extra_data).unwrap();
    data.extend(extra); // later keys override
    t.insert("data".into(), data.into());
    let model: toml::Table = toml::from_str("channels = [4, 6, 8]").unwrap();
    t.insert("model".into(), model.into());
    let train: toml::Table = toml::from_str("epochs = 2\nbatch_size = 8\nlr = 0.01\n").unwrap();
    t.insert("train".into(), train.into());
    let pr: toml::Table =
        toml::from_str("[schedule]\nwarmup_steps = 2\nrefresh_every = 2\n").unwrap();
    t.insert("pruning".into(), pr.into());
    toml::to_string(&t).unwrap()
}

fn cfg(extra: &str) -> ChangeDetConfig {
    ChangeDetConfig::from_toml(&tiny(extra)).unwrap()
}

fn pairs(extra: &str, n: usize, seed: u64) -> Pairs {
    let c = cfg(extra);
    let objs = objects(&c.data, true, 50).unwrap();
    generate(&c.data, &objs, n, seed).unwrap()
}

/// Residual of the least-squares fit `t2 = a t1 + b` over the pixels `keep`.
fn affine_residual(t1: &[f32], t2: &[f32], keep: &[usize]) -> f64 {
    let n = keep.len() as f64;
    let (mut sx, mut sy, mut sxx, mut sxy) = (0f64, 0f64, 0f64, 0f64);
    for &k in keep {
        let (x, y) = (t1[k] as f64, t2[k] as f64);
        sx += x;
        sy += y;
        sxx += x * x;
        sxy += x * y;
    }
    let a = (n * sxy - sx * sy) / (n * sxx - sx * sx);
    let b = (sy - a * sx) / n;
    keep.iter()
        .map(|&k| (t2[k] as f64 - a * t1[k] as f64 - b).abs())
        .sum::<f64>()
        / n
}

#[test]
fn pairs_are_seeded_and_changes_are_rare() {
    let a = pairs("", 40, 1);
    assert_eq!(a, pairs("", 40, 1));
    assert_ne!(a.t1, pairs("", 40, 2).t1);
    assert_eq!(a.len(), 40);
    let f = a.changed_fraction();
    assert!(f > 0.003 && f < 0.15, "changed fraction {f}");
    let px = 16 * 16;
    let unchanged = (0..40)
        .filter(|&i| a.mask[i * px..(i + 1) * px].iter().all(|&m| m == 0))
        .count();
    assert!(
        (2..=25).contains(&unchanged),
        "{unchanged} pairs without change"
    );
}

#[test]
fn masks_mark_exactly_where_the_scene_changed() {
    let px = 16 * 16;
    // no change, no noise, no shift: time 2 is an affine map of time 1 wherever not clamped
    let same = pairs("p_unchanged = 1.0\nnoise = 0.0\nmax_shift = 0\n", 20, 3);
    assert!(same.mask.iter().all(|&m| m == 0));
    for i in 0..20 {
        let (t1, t2) = (
            &same.t1[i * px..(i + 1) * px],
            &same.t2[i * px..(i + 1) * px],
        );
        let keep: Vec<usize> = (0..px)
            .filter(|&k| t1[k] > 0.0 && t1[k] < 1.0 && t2[k] > 0.0 && t2[k] < 1.0)
            .collect();
        assert!(affine_residual(t1, t2, &keep) < 1e-5, "pair {i}");
    }
    // every pair changes: the masked pixels break the affine relation
    let ch = pairs(
        "p_unchanged = 0.0\nnoise = 0.0\nmax_shift = 0\nobjects = [1, 2]\n",
        20,
        4,
    );
    let mut checked = 0;
    for i in 0..20 {
        let m = &ch.mask[i * px..(i + 1) * px];
        let (t1, t2) = (&ch.t1[i * px..(i + 1) * px], &ch.t2[i * px..(i + 1) * px]);
        let changed: Vec<usize> = (0..px).filter(|&k| m[k] == 1).collect();
        if changed.is_empty() {
            continue;
        }
        checked += 1;
        let mean_diff = changed
            .iter()
            .map(|&k| (t1[k] - t2[k]).abs() as f64)
            .sum::<f64>()
            / changed.len() as f64;
        assert!(
            mean_diff > 0.1,
            "pair {i}: changed pixels differ by {mean_diff} on average"
        );
    }
    assert!(checked >= 15, "{checked} pairs with a change");
}

#[test]
fn metrics_match_hand_counts() {
    // two 2x2 images: [TP, FP, FN, TN] and an empty pair (excluded from per-image means)
    let prob = [0.9, 0.6, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1];
    let truth = [1, 0, 1, 0, 0, 0, 0, 0];
    let m = change_metrics(&prob, &truth, 4).unwrap();
    assert!(change_metrics(&prob, &truth, 0).is_err());
    assert!(change_metrics(&prob, &truth[..4], 4).is_err());
    assert_eq!(
        Counts::of(&prob[..4], &truth[..4]),
        Counts {
            tp: 1,
            fp: 1,
            fn_: 1
        }
    );
    assert!((m["iou_pooled"] - 1.0 / 3.0).abs() < 1e-12);
    assert!((m["f1_pooled"] - 0.5).abs() < 1e-12);
    assert!((m["iou_per_image"] - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(m["images_both_empty"], 1.0);
    // ranking: 0.9 (positive), 0.6, 0.2, then five tied at 0.1 holding the other positive:
    // AP = 0.5 * 1 + 0.5 * 2/8
    assert!((m["pr_auc"] - 0.625).abs() < 1e-12, "{}", m["pr_auc"]);
}

#[test]
fn most_found_ranks_pairs_by_pixels_one_finds_and_the_other_misses() {
    let test = Pairs {
        size: 2,
        t1: vec![0.0; 12],
        t2: vec![0.0; 12],
        mask: vec![1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0],
    };
    let a = [255, 255, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0];
    let b = [0, 0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0];
    assert_eq!(most_found(&test, &a, &b, 5).unwrap(), vec![(0, 2), (2, 2)]);
    assert_eq!(most_found(&test, &a, &b, 1).unwrap(), vec![(0, 2)]);
    assert!(most_found(&test, &b, &a, 5).unwrap().is_empty());
    assert!(most_found(&test, &a[..4], &b, 5).is_err());
}

#[test]
fn shared_encoder_gradients_match_finite_differences() {
    // one weight tensor serves both images; its gradient sums both branches
    let dev = Cpu::default();
    let c = cfg("");
    let mut st = ParamStore::new(&dev);
    let net = SiamNet::new(&c.model, &mut st, 8, 5).unwrap();
    let (px, b) = (64, 3);
    let p = pairs("size = 8\nobject_size = 3\n", b, 7);
    let mut x = p.t1.clone();
    x.extend_from_slice(&p.t2);
    let xin = to_channel_major(&x, 2 * b, px).unwrap();
    let mut target = vec![0f32; px * b];
    for i in 0..b {
        for j in 0..px {
            target[j * b + i] = ((i + j) % 5 == 0) as u8 as f32; // a fixed, non-trivial target
        }
    }
    let loss_of = |st: &ParamStore| -> f64 {
        let z = net
            .forward(
                st,
                dev.tensor_from_vec(xin.clone(), (px, 2 * b)),
                &mut Ctx::train(),
            )
            .unwrap();
        ops::weighted_bce_with_logits(z, &target, 3.0, "t")
            .unwrap()
            .1
    };
    let z = net
        .forward(
            &st,
            dev.tensor_from_vec(xin.clone(), (px, 2 * b)).leaky_traced(),
            &mut Ctx::train(),
        )
        .unwrap();
    assert_eq!(*z.shape(), (px, b));
    let g = ops::weighted_bce_with_logits(z, &target, 3.0, "t")
        .unwrap()
        .0
        .backward();
    for name in ["e2a.weight", "e3b.weight", "d2.weight"] {
        let id = st.find(name).unwrap();
        let an = g.get(st.tensor(id)).as_vec();
        let n = an.len();
        let (mut ok, mut total) = (0, 0);
        for k in (0..n).step_by(n / 7 + 1) {
            let orig = st.host(id)[k];
            let eps = 1e-2;
            st.host_mut(id)[k] = orig + eps;
            st.sync(id);
            let lp = loss_of(&st);
            st.host_mut(id)[k] = orig - eps;
            st.sync(id);
            let lm = loss_of(&st);
            st.host_mut(id)[k] = orig;
            st.sync(id);
            let num = (lp - lm) / (2.0 * eps as f64);
            total += 1;
            // ReLU and max-pool kinks can spoil a coordinate; the rest must agree
            if (an[k] as f64 - num).abs() <= 2e-3 + 2e-2 * num.abs() {
                ok += 1;
            }
        }
        assert!(
            ok * 4 >= total * 3,
            "{name}: {ok} of {total} coordinates agree"
        );
    }
}

#[test]
fn the_experiment_runs_end_to_end_with_panels() {
    let d = TempDir::unmade("changedet-e2e");
    run_in(&tiny(""), &d.0, true, true, None).unwrap();
    let rep = std::fs::read_to_string(d.0.join("report.md")).unwrap();
    assert!(rep.contains("stand-in"));
    for s in ["bb_sp_in-d0.7", "magnitude-d0.5", "PR-AUC", "IoU per image"] {
        assert!(rep.contains(s), "{s} in the report");
    }
    let r = bb_tasks::convrun::read_result(&d.0.join("bb_sp_in-d0.7/seed-0")).unwrap();
    let pruned: Vec<&str> = r
        .layers
        .iter()
        .filter(|l| l.pruned)
        .map(|l| l.layer.as_str())
        .collect();
    assert_eq!(pruned, ["e1b", "e2a", "e2b", "e3a", "e3b"]);
    for l in r.layers.iter().filter(|l| l.pruned) {
        assert!(
            (l.achieved_density - 0.7).abs() < 0.05,
            "{}: {}",
            l.layer,
            l.achieved_density
        );
    }
    for k in [
        "iou_pooled",
        "f1_pooled",
        "iou_per_image",
        "f1_per_image",
        "pr_auc",
    ] {
        assert!((0.0..=1.0).contains(&r.metrics[k]), "{k}");
    }
    assert!(d.0.join("bb_sp_in-d0.7/seed-0/test_prob.npy").exists());
    // every panel the report links exists and is a PNG of whole tiles
    for line in rep.lines().filter(|l| l.starts_with("![")) {
        let file = line.split("](").nth(1).unwrap().trim_end_matches(')');
        let f = std::fs::File::open(d.0.join(file)).unwrap();
        let dec = png::Decoder::new(f).read_info().unwrap();
        let info = dec.info();
        assert_eq!(info.width as usize, 5 * 16 * 4 + 6 * 4);
        assert_eq!((info.height as usize - 4) % (16 * 4 + 4), 0);
    }
}

#[test]
fn bad_configs_fail_before_any_folder_is_made() {
    for (extra, field) in [
        ("size = 18\n", "data.size"),
        ("objects = [3, 2]\n", "data.objects"),
        ("p_unchanged = 1.5\n", "data.p_unchanged"),
        ("colour = true\n", "colour"),
    ] {
        let text = tiny(extra);
        let d = TempDir::unmade("changedet-bad");
        let e = format!("{:#}", run_in(&text, &d.0, true, true, None).unwrap_err());
        assert!(e.contains(field), "{field}: {e}");
        assert!(!d.0.exists());
    }
}

#[test]
fn preset_parses_and_validates() {
    let p = CONV_PRESETS.iter().find(|p| p.name == "changedet").unwrap();
    let c = ChangeDetConfig::from_toml(p.toml).unwrap();
    c.validate().unwrap();
    assert!(c.description.contains("stand-in"));
    assert!(c.seeds.len() >= 3);
    assert_eq!(c.panels.density, 0.7);
}
