//! The face-identification stand-in: the verification metrics against brute force, the data
//! protocol, the ResNet's engine view, and the whole experiment end to end on synthetic
//! images (CI-sized), including resume and bad configs.

mod common;

use bb_tasks::cli_conv::{run_in, CONV_PRESETS};
use bb_tasks::convkit::{input, Ctx, ParamStore};
use bb_tasks::convrun::{read_result, ConvRunResult};
use bb_tasks::faceid::{best_threshold, build_data, roc_auc, FaceIdConfig};
use bb_tasks::resnet::{ResNet, ResNetConfig};
use common::TempDir;
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// The Fashion-MNIST preset shrunk to synthetic images, one seed and a few steps.
fn tiny_config(arms_from_preset: bool) -> String {
    let preset = CONV_PRESETS.iter().find(|p| p.name == "faceid").unwrap();
    let mut t: toml::Table = toml::from_str(preset.toml).unwrap();
    t.insert("name".into(), "faceid-tiny".into());
    t.insert("seeds".into(), toml::Value::Array(vec![0.into()]));
    let data: toml::Table = toml::from_str(
        "source = \"synthetic\"\nheldout_classes = [6, 7, 8, 9]\nsynthetic_size = 12\n\
         synthetic_per_class = 20\nverify_pairs = 100\neval_subset = 32\n",
    )
    .unwrap();
    t.insert("data".into(), data.into());
    let train: toml::Table =
        toml::from_str("epochs = 2\nbatch_size = 16\nlr = 0.005\ncheckpoint_every = 1\n").unwrap();
    t.insert("train".into(), train.into());
    let pr: toml::Table =
        toml::from_str("[schedule]\nwarmup_steps = 2\nrefresh_every = 3\n").unwrap();
    t.insert("pruning".into(), pr.into());
    if !arms_from_preset {
        let arms: toml::Table = toml::from_str(
            "[[arms]]\nname = \"dense\"\nprune = false\n\
             [[arms]]\nname = \"bb_sp_in\"\ndensities = [0.5]\n\
             [arms.pruning.policy]\nkind = \"balance\"\nbeta = 0.2\n",
        )
        .unwrap();
        t.insert("arms".into(), arms["arms"].clone());
    }
    toml::to_string(&t).unwrap()
}

#[test]
fn roc_auc_matches_pair_counting() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..20 {
        let n = r.gen_range(2..40);
        let s: Vec<f64> = (0..n).map(|_| r.gen_range(0..6) as f64).collect(); // many ties
        let l: Vec<bool> = (0..n).map(|_| r.gen_bool(0.4)).collect();
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..n {
            for j in 0..n {
                if l[i] && !l[j] {
                    den += 1.0;
                    num += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        let got = roc_auc(&s, &l);
        if den == 0.0 {
            assert!(got.is_none());
        } else {
            assert!((got.unwrap() - num / den).abs() < 1e-12);
        }
    }
    assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
    assert_eq!(roc_auc(&[0.1, 0.9], &[false]), None);
    assert_eq!(best_threshold(&[0.1, 0.9], &[true]), None);
}

#[test]
fn best_threshold_matches_brute_force() {
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..20 {
        let n = r.gen_range(1..30);
        let s: Vec<f64> = (0..n).map(|_| r.gen_range(0..8) as f64 / 4.0).collect();
        let l: Vec<bool> = (0..n).map(|_| r.gen_bool(0.5)).collect();
        let (t, acc) = best_threshold(&s, &l).unwrap();
        let acc_at =
            |t: f64| s.iter().zip(&l).filter(|(&v, &y)| (v >= t) == y).count() as f64 / n as f64;
        assert!(
            (acc_at(t) - acc).abs() < 1e-12,
            "reported accuracy holds at the threshold"
        );
        let mut cands: Vec<f64> = s.iter().map(|v| v + 1e-9).collect();
        cands.push(f64::NEG_INFINITY);
        let best = cands.iter().map(|&c| acc_at(c)).fold(0.0, f64::max);
        assert!((best - acc).abs() < 1e-12, "{best} vs {acc}");
    }
}

#[test]
fn the_protocol_keeps_held_out_classes_out_of_training() {
    let cfg = FaceIdConfig::from_toml(&tiny_config(false)).unwrap();
    let d = build_data(&cfg, 0).unwrap();
    assert_eq!(d.seen, vec![0, 1, 2, 3, 4, 5]);
    assert!(d.train_y.iter().all(|&y| y < 6));
    assert_eq!(d.train_y.len(), 6 * 20);
    assert!(d.verify_y.iter().all(|y| [6, 7, 8, 9].contains(y)));
    let half = d.verify_y.len() / 2;
    for (pairs, lo, hi) in [
        (&d.val_pairs, 0, half),
        (&d.test_pairs, half, d.verify_y.len()),
    ] {
        assert_eq!(pairs.len(), 100);
        assert_eq!(pairs.iter().filter(|p| p.2).count(), 50);
        for &(a, b, same) in pairs.iter() {
            assert!(
                (lo..hi).contains(&a) && (lo..hi).contains(&b),
                "halves are disjoint"
            );
            assert_ne!(a, b);
            assert_eq!(d.verify_y[a] == d.verify_y[b], same);
        }
    }
    // the training draw follows the seed, the evaluation sets do not
    let mut cfg2 = cfg.clone();
    cfg2.data.train_per_class = Some(10);
    let (a, b) = (build_data(&cfg2, 0).unwrap(), build_data(&cfg2, 1).unwrap());
    assert_ne!(a.train_x, b.train_x);
    assert_eq!(a.test_x, b.test_x);
    assert_eq!(a.test_pairs, b.test_pairs);
}

#[test]
fn resnet_exposes_the_first_1x1_conv_of_every_block() {
    let dev = Cpu::default();
    let mut st = ParamStore::new(&dev);
    let cfg: ResNetConfig =
        toml::from_str("stem = 4\nblocks = [{ mid = 2, out = 8 }, { mid = 3, out = 8, stride = 2 }, { mid = 3, out = 8 }]")
            .unwrap();
    let net = ResNet::new(&cfg, &mut st, 1, (12, 12), 5, 0).unwrap();
    assert_eq!(net.prunable(), vec!["b1.c1", "b2.c1", "b3.c1"]);
    let topo = net.topology();
    topo.validate().unwrap();
    let names: Vec<&str> = topo.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stem", "b1.c1", "b1.c2", "b1.c3", "b1.proj", "b2.c1", "b2.c2", "b2.c3", "b2.proj",
            "b3.c1", "b3.c2", "b3.c3"
        ]
    );
    let l = topo.layer_index("b2.c1").unwrap();
    assert_eq!(topo.layers[l].input, "b1");
    assert_eq!(topo.shape(l).kernel, vec![1, 1]);
    assert!(topo.is_hidden("b2.c1"));
    assert_eq!(net.layer_weights().len(), names.len());
    let x: Vec<f32> = (0..3 * 144).map(|i| (i % 7) as f32 / 7.0).collect();
    let mut ctx = Ctx::train();
    let out = net
        .forward(&st, input(&dev, &x, 3, 144).unwrap(), &mut ctx)
        .unwrap();
    assert_eq!(*out.logits.shape(), (3, 5));
    assert_eq!(*out.embedding.shape(), (8, 3));
    let tapped: Vec<&str> = ctx.taps.iter().map(|t| t.population.as_str()).collect();
    for p in topo.populations.iter().skip(1) {
        assert!(
            tapped.contains(&p.name.as_str()),
            "population {} is tapped",
            p.name
        );
    }
    let t = ctx.taps.iter().find(|t| t.population == "b2.c1").unwrap();
    assert_eq!((t.units, t.positions, t.batch), (3, 36, 3));
}

/// Drops the timing fields (not reproducible).
fn strip(mut r: ConvRunResult) -> ConvRunResult {
    assert!(r.wall_s > 0.0);
    r.wall_s = 0.0;
    r.cpu_s = None;
    r
}

fn results(dir: &Path) -> Vec<ConvRunResult> {
    let mut v: Vec<ConvRunResult> = ["dense/seed-0", "bb_sp_in-d0.5/seed-0"]
        .iter()
        .map(|r| strip(read_result(&dir.join(r)).unwrap()))
        .collect();
    v.sort_by(|a, b| a.arm.cmp(&b.arm));
    v
}

#[test]
fn the_experiment_runs_end_to_end_and_resumes_to_the_same_result() {
    let text = tiny_config(false);
    let a = TempDir::unmade("faceid-full");
    run_in(&text, &a.0, true, true, None).unwrap();
    let rep = std::fs::read_to_string(a.0.join("report.md")).unwrap();
    assert!(rep.contains("stand-in"), "the report says it is a stand-in");
    assert!(rep.contains("bb_sp_in-d0.5") && rep.contains("verification ROC-AUC"));
    assert!(a.0.join("results.json").exists() && a.0.join("config.toml").exists());
    let full = results(&a.0);
    let bb = full.iter().find(|r| r.method == "bb_sp_in").unwrap();
    assert!(bb.refreshes > 0);
    assert!(bb
        .layers
        .iter()
        .filter(|l| l.pruned)
        .all(|l| l.achieved_density == 0.5));
    let pruned: Vec<&str> = bb
        .layers
        .iter()
        .filter(|l| l.pruned)
        .map(|l| l.layer.as_str())
        .collect();
    assert_eq!(pruned, ["b1.c1", "b2.c1", "b3.c1"]);
    for k in ["top1", "verify_auc", "verify_acc"] {
        let v = bb.metrics[k];
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(bb.populations.len(), 3);

    let b = TempDir::unmade("faceid-resumed");
    run_in(&text, &b.0, true, true, Some(1)).unwrap();
    assert!(!b.0.join("report.md").exists());
    assert!(b.0.join("dense/seed-0/checkpoints/LATEST").exists());
    run_in(&text, &b.0, false, true, None).unwrap();
    assert_eq!(
        results(&b.0),
        full,
        "a resumed run ends where an uninterrupted one does"
    );
}

#[test]
fn every_preset_method_runs_on_a_tiny_subset() {
    let a = TempDir::unmade("faceid-preset");
    run_in(&tiny_config(true), &a.0, true, true, None).unwrap();
    let rep = std::fs::read_to_string(a.0.join("report.md")).unwrap();
    for arm in ["dense", "bb_sp_in-d0.3", "magnitude-d0.7", "rigl-d0.5"] {
        assert!(rep.contains(arm), "{arm} in the report");
    }
}

#[test]
fn bad_configs_fail_before_any_folder_is_made() {
    let cases = [
        (
            "heldout_classes = [6, 7, 8, 9]",
            "heldout_classes = [6, 7, 8, 12]",
            "heldout_classes",
        ),
        ("epochs = 2", "epochs = 0", "train.epochs"),
        ("densities = [0.5]", "densities = [1.5]", "densities"),
        (
            "synthetic_per_class = 20",
            "synthetic_per_class = 20\ncolour = true",
            "colour",
        ),
        ("batch_size = 16", "batch_size = 4000", "batch_size"),
    ];
    for (from, to, field) in cases {
        let text = tiny_config(false).replacen(from, to, 1);
        assert_ne!(text, tiny_config(false), "{from}");
        let d = TempDir::unmade("faceid-bad");
        let e = format!("{:#}", run_in(&text, &d.0, true, true, None).unwrap_err());
        assert!(e.contains(field), "{field}: {e}");
        assert!(!d.0.exists(), "no folder for a bad config ({field})");
    }
}

#[test]
fn presets_parse_and_validate() {
    for p in CONV_PRESETS.iter().filter(|p| p.name.starts_with("faceid")) {
        let c = FaceIdConfig::from_toml(p.toml).unwrap();
        c.validate().unwrap();
        assert!(c.description.contains("stand-in"));
        assert!(c.seeds.len() >= 3);
    }
}

#[test]
fn sweep_shards_share_one_folder_and_the_last_one_writes_the_report() {
    let text = tiny_config(false);
    let cfg_dir = TempDir::unmade("faceid-sweep-cfg");
    std::fs::create_dir_all(&cfg_dir.0).unwrap();
    let cfg = cfg_dir.0.join("tiny.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = TempDir::unmade("faceid-sweep-out");
    let bb = env!("CARGO_BIN_EXE_bb");
    let shard = |i: usize| {
        std::process::Command::new(bb)
            .args([
                "sweep",
                cfg.to_str().unwrap(),
                "--out",
                out.0.to_str().unwrap(),
            ])
            .args(["--shard", &format!("{i}/2"), "--quiet"])
            .output()
            .unwrap()
    };
    // two shards at once, as a job array would run them
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| shard(0));
        let b = s.spawn(|| shard(1));
        (a.join().unwrap(), b.join().unwrap())
    });
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(
        out.0.join("report.md").exists(),
        "the shard that finished last wrote the report"
    );
    // the reference: the same grid in one `bb run` process
    let full = TempDir::unmade("faceid-sweep-ref");
    let r = std::process::Command::new(bb)
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--out",
            full.0.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        results(&out.0),
        results(&full.0),
        "sharding does not change results"
    );
    // --merge rewrites the report from the finished runs; a different config is refused
    std::fs::remove_file(out.0.join("report.md")).unwrap();
    let m = std::process::Command::new(bb)
        .args([
            "sweep",
            cfg.to_str().unwrap(),
            "--out",
            out.0.to_str().unwrap(),
            "--merge",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    assert!(out.0.join("report.md").exists());
    std::fs::write(&cfg, text.replace("lr = 0.005", "lr = 0.004")).unwrap();
    let e = shard(0);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("different experiment"));
}
