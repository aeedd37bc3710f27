//! Whole runs: resume after a stop, the xor preset's balance fit, and bad configs.

use bb_tasks::cli_run::{execute, prepare, reopen, run, ExperimentOutcome, RunArgs};
use bb_tasks::config::{preset, ExperimentConfig};
use bb_tasks::trainer::{latest_checkpoint, load_pruner, read_metrics, EpochMetrics};
use dfdx::prelude::Cpu;
use std::fs;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bb-tasks-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// A small xor experiment (two arms, BB with SP-out and with SP-in) that runs in a second.
const SMALL: &str = r#"
name = "small"
description = "test"
seeds = [3]
[data]
kind = "xor"
n_train = 300
n_test = 200
distractors = 6
[model]
hidden = [12, 10]
[train]
epochs = 5
batch_size = 32
lr = 0.01
checkpoint_every = 2
[pruning.schedule]
warmup_steps = 10
refresh_every = 7
[pruning.policy]
kind = "balance"
beta = 0.3
target_density = 0.6
[[arms]]
name = "out"
[arms.pruning.actuator]
kind = "sp_out"
[[arms]]
name = "in"
[arms.pruning.actuator]
kind = "sp_in"
"#;

fn without_wall(m: &[EpochMetrics]) -> Vec<EpochMetrics> {
    m.iter()
        .map(|e| EpochMetrics {
            wall_s: 0.0,
            ..e.clone()
        })
        .collect()
}

fn final_json_without_wall(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("final.json")).unwrap()).unwrap();
    v["wall_s"] = serde_json::Value::Null;
    v
}

#[test]
fn a_stopped_and_resumed_run_ends_exactly_like_an_uninterrupted_one() {
    // Adam with a cosine schedule, and SGD with Nesterov momentum at a constant rate
    let sgd = SMALL.replace(
        "checkpoint_every = 2\n",
        "checkpoint_every = 2\nlr_schedule = \"constant\"\n[train.optimizer]\nkind = \"sgd\"\nmomentum = 0.9\nnesterov = true\n",
    );
    assert_ne!(sgd, SMALL);
    for (name, text) in [("adam", SMALL.to_string()), ("sgd", sgd)] {
        resume_matches_uninterrupted(name, &text);
    }
}

fn resume_matches_uninterrupted(name: &str, text: &str) {
    let root = scratch(&format!("resume-{name}"));
    let cfg = ExperimentConfig::from_toml(text).unwrap();
    let dev = Cpu::default();
    // uninterrupted
    let a = prepare(&cfg, &root.join("a")).unwrap();
    assert!(matches!(
        execute(&dev, &a, true, None).unwrap(),
        ExperimentOutcome::Done(_)
    ));
    // stopped after epoch 3 (checkpoints at 2 and 3), then resumed from the folder alone
    let b = prepare(&cfg, &root.join("b")).unwrap();
    assert!(matches!(
        execute(&dev, &b, true, Some(3)).unwrap(),
        ExperimentOutcome::Stopped
    ));
    for arm in ["out", "in"] {
        let d = root.join("b").join(arm).join("seed-3");
        assert!(!d.join("final.json").exists());
        assert_eq!(read_metrics(&d).unwrap().len(), 3);
        assert!(latest_checkpoint(&d)
            .unwrap()
            .unwrap()
            .ends_with("epoch-0003"));
    }
    assert!(!root.join("b/report.md").exists());
    let b2 = reopen(&root.join("b")).unwrap();
    assert!(matches!(
        execute(&dev, &b2, true, None).unwrap(),
        ExperimentOutcome::Done(_)
    ));
    for arm in ["out", "in"] {
        let da = root.join("a").join(arm).join("seed-3");
        let db = root.join("b").join(arm).join("seed-3");
        let ma = read_metrics(&da).unwrap();
        assert_eq!(ma.len(), 5);
        assert!(ma.last().unwrap().refreshes > 0, "the run must have pruned");
        assert_eq!(without_wall(&ma), without_wall(&read_metrics(&db).unwrap()));
        let ca = latest_checkpoint(&da).unwrap().unwrap();
        let cb = latest_checkpoint(&db).unwrap().unwrap();
        let (pa, pb) = (
            load_pruner(&ca).unwrap().unwrap(),
            load_pruner(&cb).unwrap().unwrap(),
        );
        for l in 0..3 {
            assert_eq!(pa.mask(l), pb.mask(l), "{arm}: final mask of layer {l}");
        }
        assert_eq!(pa.to_json().unwrap(), pb.to_json().unwrap());
        assert_eq!(
            fs::read(ca.join("model.safetensors")).unwrap(),
            fs::read(cb.join("model.safetensors")).unwrap()
        );
        assert_eq!(final_json_without_wall(&da), final_json_without_wall(&db));
        assert_eq!(
            fs::read(da.join("refreshes.jsonl")).unwrap(),
            fs::read(db.join("refreshes.jsonl")).unwrap()
        );
    }
    fs::remove_dir_all(&root).unwrap();
}

/// The xor preset, unchanged (seeded): BB with SP-out on the inputs' and the first hidden
/// layer's fan-out.
///
/// With SP-out and the balance policy each unit's fan-out is set at every refresh to
/// `d0 + ln((1 - a)/a) / beta` from its training-time on-rate EMA `a`, then clipped to
/// `[k_min, D]` and rounded. A network that keeps the rule's line would give a fit with slope
/// `beta = 0.1` and R^2 = 1. What can break it: activity that drifts after the last refresh,
/// the difference between the EMA over training batches and the on-rate over the evaluation
/// set, clipping at 1 and 64, and regrowth. Fan-outs assigned at random would give R^2 near 0
/// (expected 1/(n-1), about 0.02 for ~60 units). So the test asks for a positive slope
/// within a factor two of beta and R^2 >= 0.6 for the first hidden layer (seeds 0-4 measured
/// 0.82-0.92), and R^2 >= 0.9 for the inputs, whose on-rates are fixed by the data.
#[test]
fn xor_preset_units_sit_on_a_balance_line_with_positive_slope() {
    let root = scratch("xor");
    let cfg = ExperimentConfig::from_toml(preset("xor").unwrap().toml).unwrap();
    let prep = prepare(&cfg, &root.join("run")).unwrap();
    let ExperimentOutcome::Done(res) = execute(&Cpu::default(), &prep, true, None).unwrap() else {
        panic!("the run did not finish");
    };
    let bb = res.arms.iter().find(|a| a.arm == "bb_sp_out").unwrap();
    assert!(bb.test_acc.mean > 0.95, "xor accuracy {}", bb.test_acc.mean);
    let fit = |pop: &str| bb.balance.iter().find(|b| b.population == pop).unwrap();
    let (h, inp) = (fit("fc1"), fit("input"));
    assert!(
        h.slope.mean > 0.05 && h.slope.mean < 0.2,
        "fc1 slope {}",
        h.slope.mean
    );
    assert!(h.r2.mean >= 0.6, "fc1 R^2 {}", h.r2.mean);
    assert!(inp.slope.mean > 0.05 && inp.slope.mean < 0.2);
    assert!(inp.r2.mean >= 0.9, "input R^2 {}", inp.r2.mean);
    // the dense arm has no fit (all fan-outs equal)
    let dense = res.arms.iter().find(|a| a.arm == "dense").unwrap();
    assert!(dense.balance.is_empty());
    // the report and its plots are there
    let report = fs::read_to_string(root.join("run/report.md")).unwrap();
    assert!(report.contains("| bb_sp_out | fc1 |"));
    for f in [
        "plots/accuracy.svg",
        "plots/balance-bb_sp_out-fc1.svg",
        "results.json",
    ] {
        let p = root.join("run").join(f);
        assert!(fs::metadata(&p).unwrap().len() > 100, "{}", p.display());
    }
    fs::remove_dir_all(&root).unwrap();
}

fn run_args(experiment: &str, out: &Path) -> RunArgs {
    RunArgs {
        experiment: Some(experiment.to_string()),
        resume: None,
        out: Some(out.to_path_buf()),
        runs_dir: out.parent().unwrap().to_path_buf(),
        quiet: true,
        device: Default::default(),
        stop_after: None,
    }
}

#[test]
fn bad_configs_name_the_field_and_leave_no_run_folder() {
    let root = scratch("bad");
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown preset", "no-such-preset".into(), "unknown preset"),
        (
            "missing field",
            SMALL.replace("epochs = 5\n", ""),
            "missing field `epochs`",
        ),
        (
            "zero width",
            SMALL.replace("hidden = [12, 10]", "hidden = [12, 0]"),
            "model.hidden[1] is 0",
        ),
        (
            "batch larger than the data",
            SMALL.replace("batch_size = 32", "batch_size = 301"),
            "train.batch_size (301) is larger than the training set (300 samples)",
        ),
        (
            "bad engine parameter",
            SMALL.replace("beta = 0.3", "beta = -1.0"),
            "policy.beta",
        ),
        (
            "unknown field",
            SMALL.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 3"),
            "unknown field `learning_rate`",
        ),
        (
            "zero epochs",
            SMALL.replace("epochs = 5", "epochs = 0"),
            "train.epochs",
        ),
    ];
    // a device this build cannot use is refused before anything is written
    #[cfg(not(feature = "cuda"))]
    {
        let out = root.join("cuda");
        let mut args = run_args("xor", &out);
        args.device = bb_tasks::cli_run::DeviceKind::Cuda;
        let msg = format!("{:#}", run(&args).unwrap_err());
        assert!(msg.contains("--device cuda"), "{msg}");
        assert!(!out.exists());
    }
    for (i, (what, text, needle)) in cases.iter().enumerate() {
        let exp = if text.contains('\n') {
            let p = root.join(format!("cfg{i}.toml"));
            fs::write(&p, text).unwrap();
            p.display().to_string()
        } else {
            text.clone()
        };
        let out = root.join(format!("out{i}"));
        let err = run(&run_args(&exp, &out)).expect_err(what);
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(!out.exists(), "{what}: a run folder was left behind");
    }
    // only the config files remain in the scratch folder
    let left: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".toml"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    fs::remove_dir_all(&root).unwrap();
}
