//! Sweeps: grid expansion, sharding, resume, merge, concurrent shards in one folder, the
//! summary's intervals and verdicts, and the statistics they rest on. Most tests plug in a fake
//! executor (instant, deterministic records); one trains the CI grid end to end with the real
//! runner on generated IDX files, as two concurrent `bb` processes.

mod common;

use bb_tasks::stats::{
    average_precision, mean_ci95, paired_differences, student_t_quantile, Buckets, Confusion,
    Verdict,
};
use bb_tasks::sweep::{
    self, collect, merge, run_sweep, Executor, Family, Job, Metric, RunKey, RunOptions, RunRecord,
    Shard, SweepConfig,
};
use common::{write_image_set, TempDir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const GRID: &str = r#"
name = "grid"
seeds = [0, 1, 2]
densities = [0.5, 0.25, 0.1]

[base.model]
hidden = [8]
[base.train]
epochs = 1
batch_size = 16
lr = 0.01
[base.pruning.schedule]
refresh_every = 5

[[datasets]]
name = "lt"
[datasets.data]
kind = "mnist"
imbalance = 10.0
[[datasets]]
name = "digits"
[datasets.data]
kind = "digits"

[[methods]]
name = "dense"
prune = false
[[methods]]
name = "bb"
family = "bb"
[methods.pruning.policy]
kind = "balance"
beta = 0.1
[[methods]]
name = "mag"
family = "baseline"
[methods.pruning.policy]
kind = "magnitude"
[[methods]]
name = "tt"
family = "reference"
density_fields = ["policy.dens_frequent"]
[methods.pruning.policy]
kind = "two_threshold"
"#;

fn grid() -> SweepConfig {
    SweepConfig::from_toml(GRID).unwrap()
}

/// A fake run: records are a deterministic function of the key; every call is logged.
struct Fake {
    calls: Mutex<Vec<RunKey>>,
    value: fn(&RunKey) -> f64,
    sleep_ms: u64,
}

impl Fake {
    fn new(value: fn(&RunKey) -> f64) -> Self {
        Self {
            calls: Mutex::new(Vec::new()),
            value,
            sleep_ms: 0,
        }
    }

    fn calls(&self) -> Vec<RunKey> {
        self.calls.lock().unwrap().clone()
    }
}

fn record(key: &RunKey, family: Family, acc: f64) -> RunRecord {
    RunRecord {
        key: key.clone(),
        family,
        accuracy: acc,
        per_class_accuracy: vec![acc; 3],
        train_class_counts: vec![100, 30, 10],
        head_accuracy: Some(acc + 0.05),
        mid_accuracy: Some(acc),
        tail_accuracy: Some(acc - 0.1),
        macro_f1: acc - 0.01,
        rare_recall: None,
        pr_auc: None,
        entropy_bits: Some(0.5),
        decorrelation: Some(0.1),
        achieved_density: key.density().unwrap_or(1.0),
        layers: Vec::new(),
        steps: 10,
        wall_s: 0.5,
    }
}

impl Executor for Fake {
    fn execute(&self, job: &Job, dir: &Path) -> anyhow::Result<RunRecord> {
        std::fs::create_dir_all(dir)?;
        // what an interrupted attempt left behind is visible to the next one
        let marker = dir.join("attempts");
        let n = std::fs::read_to_string(&marker)
            .map(|s| s.trim().parse::<u32>().unwrap_or(0))
            .unwrap_or(0);
        std::fs::write(&marker, (n + 1).to_string())?;
        std::fs::create_dir_all(dir.join("arm/seed-0/checkpoints"))?;
        if self.sleep_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.sleep_ms));
        }
        self.calls.lock().unwrap().push(job.key.clone());
        Ok(record(&job.key, job.family, (self.value)(&job.key)))
    }
}

fn acc_by_seed(k: &RunKey) -> f64 {
    0.5 + 0.01 * k.seed as f64
}

#[test]
fn the_grid_expands_to_every_method_density_seed_and_dataset() {
    let g = grid();
    let keys = g.keys();
    // 2 data sets x (dense once + 3 pruned methods x 3 densities) x 3 seeds
    assert_eq!(keys.len(), 2 * (1 + 3 * 3) * 3);
    let dirs: std::collections::BTreeSet<PathBuf> = keys.iter().map(|(k, _)| k.rel_dir()).collect();
    assert_eq!(dirs.len(), keys.len(), "every run has its own folder");
    assert!(keys
        .iter()
        .filter(|(k, _)| k.method == "dense")
        .all(|(k, f)| k.density().is_none() && *f == Family::Dense));
    let jobs = g.jobs().unwrap();
    let pol = |j: &Job| {
        j.experiment.arms[0].pruning["policy"]
            .as_table()
            .unwrap()
            .clone()
    };
    for j in &jobs {
        assert_eq!(j.experiment.seeds, vec![j.key.seed]);
        assert_eq!(j.experiment.arms.len(), 1);
        assert_eq!(j.experiment.arms[0].name, j.key.method);
        match j.key.method.as_str() {
            "dense" => assert!(!j.experiment.arms[0].prune),
            "tt" => {
                let p = pol(j);
                assert_eq!(p["dens_frequent"].as_float(), j.key.density());
                assert!(!p.contains_key("target_density"));
            }
            _ => assert_eq!(pol(j)["target_density"].as_float(), j.key.density()),
        }
    }
    assert_eq!(
        jobs.iter()
            .find(|j| j.key.method == "bb" && j.key.density_milli == Some(250))
            .unwrap()
            .key
            .rel_dir(),
        Path::new("runs/lt/bb/d0.250/seed-0")
    );
}

#[test]
fn bad_sweep_files_fail_with_the_field_named() {
    let bad = |from: &str, to: &str| {
        let text = GRID.replacen(from, to, 1);
        let e = match SweepConfig::from_toml(&text) {
            Ok(c) => c.validate().unwrap_err(),
            Err(e) => e,
        };
        format!("{e:#}")
    };
    assert!(bad("densities = [0.5, 0.25, 0.1]", "densities = [0.5, 1.5]").contains("densities[1]"));
    assert!(
        bad("densities = [0.5, 0.25, 0.1]", "densities = [0.5, 0.5]").contains("appears twice")
    );
    assert!(bad("densities = [0.5, 0.25, 0.1]", "densities = [0.1234]").contains("three decimals"));
    assert!(bad("seeds = [0, 1, 2]", "seeds = []").contains("seeds"));
    assert!(bad("name = \"mag\"", "name = \"bb\"").contains("methods[2].name"));
    assert!(bad(
        "name = \"dense\"\nprune = false",
        "name = \"dense\"\nprune = false\nfamily = \"bb\""
    )
    .contains("methods[0]"));
    assert!(bad("imbalance = 10.0", "imbalance = 0.1").contains("data.imbalance"));
    assert!(bad(
        "[[methods]]\nname = \"bb\"",
        "[[methods]]\nname = \"bb\"\ncolour = 1"
    )
    .contains("colour"));
    assert!(bad("name = \"grid\"", "name = \"a grid\"").contains("name"));
}

#[test]
fn shard_specs_parse_and_refuse_nonsense() {
    let s: Shard = "2/5".parse().unwrap();
    assert_eq!((s.index, s.count), (2, 5));
    for bad in ["5/5", "0/0", "x/2", "1", "-1/2"] {
        assert!(bad.parse::<Shard>().is_err(), "{bad}");
    }
}

#[test]
fn every_run_is_in_exactly_one_shard_for_any_shard_count() {
    let n_runs = grid().keys().len();
    for n in 1..=(n_runs + 3) {
        let mut owners = vec![0usize; n_runs];
        for i in 0..n {
            let s = Shard { index: i, count: n };
            for (pos, o) in owners.iter_mut().enumerate() {
                *o += s.owns(pos) as usize;
            }
        }
        assert!(owners.iter().all(|&o| o == 1), "N = {n}: {owners:?}");
    }
}

#[test]
fn shards_run_their_share_and_together_complete_the_grid_once() {
    let t = TempDir::new("shards");
    let g = grid();
    let fake = Fake::new(acc_by_seed);
    let n = 4;
    let mut total = 0;
    for i in 0..n {
        let opts = RunOptions {
            shard: Some(Shard { index: i, count: n }),
            quiet: true,
            ..Default::default()
        };
        let s = run_sweep(&g, t.path(), &opts, &fake).unwrap();
        let expect = (0..g.keys().len()).filter(|p| p % n == i).count();
        assert_eq!((s.assigned, s.trained, s.skipped), (expect, expect, 0));
        total += s.trained;
    }
    assert_eq!(total, g.keys().len());
    let mut calls = fake.calls();
    calls.sort();
    let mut want: Vec<RunKey> = g.keys().into_iter().map(|(k, _)| k).collect();
    want.sort();
    assert_eq!(calls, want, "each grid point trained exactly once");
    let col = collect(&g, t.path()).unwrap();
    assert_eq!(
        (col.records.len(), col.missing.len(), col.partial),
        (want.len(), 0, 0)
    );
    // checkpoints were dropped once the records were written
    let some = t.path().join(want[0].rel_dir());
    assert!(some.join("record.json").is_file());
    assert!(!some.join("arm/seed-0/checkpoints").exists());
}

#[test]
fn a_partial_sweep_resumes_where_it_stopped() {
    let t = TempDir::new("resume");
    let g = grid();
    let fake = Fake::new(acc_by_seed);
    let opts = RunOptions {
        max_runs: Some(7),
        quiet: true,
        ..Default::default()
    };
    let first = run_sweep(&g, t.path(), &opts, &fake).unwrap();
    assert_eq!((first.trained, first.not_started), (7, g.keys().len() - 7));
    assert_eq!(
        collect(&g, t.path()).unwrap().missing.len(),
        g.keys().len() - 7
    );
    // an attempt killed mid-run by a process that is gone: its partial folder is taken over
    let key = collect(&g, t.path()).unwrap().missing[0].clone();
    let fin = t.path().join(key.rel_dir());
    // the host part of a partial folder's name: letters and digits, the rest as '_'
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // (pid 4294967 is above Linux's pid_max, so no such process exists)
    let planted = cfg!(target_os = "linux") && !host.is_empty();
    if planted {
        let orphan = fin.with_file_name(format!("seed-{}.partial-{host}-4294967-0", key.seed));
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(orphan.join("attempts"), "1").unwrap();
    }
    let second = run_sweep(
        &g,
        t.path(),
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
        &fake,
    )
    .unwrap();
    assert_eq!(second.skipped, 7);
    assert_eq!(second.trained, g.keys().len() - 7);
    assert_eq!(
        fake.calls().len(),
        g.keys().len(),
        "no finished run was trained twice"
    );
    let col = collect(&g, t.path()).unwrap();
    assert!(col.missing.is_empty());
    assert_eq!(col.partial, 0, "the orphan was adopted, not left behind");
    if planted {
        // the second attempt continued in the first one's folder
        assert_eq!(std::fs::read_to_string(fin.join("attempts")).unwrap(), "2");
    }
    // a third call has nothing to do
    let third = run_sweep(
        &g,
        t.path(),
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
        &fake,
    )
    .unwrap();
    assert_eq!((third.trained, third.skipped), (0, g.keys().len()));
}

#[test]
fn an_output_folder_of_another_sweep_is_refused() {
    let t = TempDir::new("other");
    let fake = Fake::new(acc_by_seed);
    let opts = RunOptions {
        max_runs: Some(1),
        quiet: true,
        ..Default::default()
    };
    run_sweep(&grid(), t.path(), &opts, &fake).unwrap();
    let refused = |text: String| {
        let other = SweepConfig::from_toml(&text).unwrap();
        run_sweep(&other, t.path(), &opts, &fake)
            .unwrap_err()
            .to_string()
    };
    let e = refused(GRID.replace("seeds = [0, 1, 2]", "seeds = [0, 1]"));
    assert!(e.contains("different sweep") && e.contains("seed 2"), "{e}");
    let e = refused(GRID.replace("beta = 0.1", "beta = 0.2"));
    assert!(e.contains("method \"bb\" differs"), "{e}");
    let e = refused(GRID.replace("epochs = 1", "epochs = 2"));
    assert!(e.contains("[base] differs"), "{e}");
}

#[test]
fn a_grown_grid_reuses_the_finished_runs_and_trains_only_the_new_ones() {
    let t = TempDir::new("grow");
    let fake = Fake::new(acc_by_seed);
    let quiet = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let g = grid();
    run_sweep(&g, t.path(), &quiet, &fake).unwrap();
    let extra = "\n[[methods]]\nname = \"bb_plain\"\nfamily = \"bb\"\n\
                 [methods.pruning.policy]\nkind = \"balance\"\nbeta = 0.1\n\
                 [methods.pruning.actuator]\nkind = \"sp_in\"\nrescale = \"none\"\n";
    let grown_text = GRID.replace("seeds = [0, 1, 2]", "seeds = [0, 1, 2, 3]") + extra;
    let grown = SweepConfig::from_toml(&grown_text).unwrap();
    assert!(grown.extends(&g).is_ok());
    assert!(g.extends(&grown).is_err(), "shrinking is not growing");
    let s = run_sweep(&grown, t.path(), &quiet, &fake).unwrap();
    assert_eq!(s.skipped, g.keys().len());
    assert_eq!(s.trained, grown.keys().len() - g.keys().len());
    assert_eq!(fake.calls().len(), grown.keys().len());
    // the folder now describes the grown sweep; the old file is refused there
    assert_eq!(sweep::load_from_out_dir(t.path()).unwrap(), grown);
    assert!(run_sweep(&g, t.path(), &quiet, &fake).is_err());
}

#[test]
fn concurrent_shards_in_one_folder_complete_every_run_once() {
    let t = TempDir::new("concurrent");
    let g = grid();
    let mut fake = Fake::new(acc_by_seed);
    fake.sleep_ms = 3;
    let n = 3;
    // shards 0..3, plus a second copy of shard 0 racing the first
    let shards: Vec<Shard> = (0..n)
        .map(|i| Shard { index: i, count: n })
        .chain([Shard { index: 0, count: n }])
        .collect();
    let sums: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = shards
            .iter()
            .map(|&sh| {
                let (g, fake, out) = (&g, &fake, t.path());
                s.spawn(move || {
                    let opts = RunOptions {
                        shard: Some(sh),
                        quiet: true,
                        ..Default::default()
                    };
                    run_sweep(g, out, &opts, fake).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let col = collect(&g, t.path()).unwrap();
    assert!(col.missing.is_empty());
    assert_eq!(col.records.len(), g.keys().len());
    assert_eq!(col.partial, 0, "no partial folder is left behind");
    let done: usize = sums.iter().map(|s| s.trained).sum();
    assert_eq!(
        done,
        g.keys().len(),
        "each run moved into place exactly once"
    );
    for r in &col.records {
        assert_eq!(r.accuracy, acc_by_seed(&r.key));
    }
    // merging while nothing runs gives the full summary
    let m = merge(&g, t.path(), None).unwrap();
    assert_eq!(m.summary.complete, g.keys().len());
    assert!(t.path().join("summary/summary.md").is_file());
    assert!(t.path().join("summary/plots/lt-accuracy.svg").is_file());
}

/// BB beats the baseline by 2 points on every seed at 0.5, matches it (with noise) at 0.25,
/// and trails by 3 points at 0.1.
fn planted(k: &RunKey) -> f64 {
    let noise = [0.004, -0.003, 0.001][k.seed as usize % 3];
    let base = 0.7 + 0.01 * k.seed as f64;
    match (k.method.as_str(), k.density_milli) {
        ("bb", Some(500)) => base + 0.02,
        ("bb", Some(250)) => base + noise,
        ("bb", Some(100)) => base - 0.03,
        ("tt", _) => 0.99, // a reference method never wins the comparison
        ("dense", _) => 0.8,
        _ => base,
    }
}

#[test]
fn the_summary_reports_intervals_and_verdicts_from_the_records() {
    let t = TempDir::new("summary");
    let g = grid();
    let fake = Fake::new(planted);
    run_sweep(
        &g,
        t.path(),
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
        &fake,
    )
    .unwrap();
    let m = merge(&g, t.path(), Some(&t.path().join("report"))).unwrap();
    let d = &m.summary.datasets[0];
    assert_eq!(d.name, "lt");
    // the cell of mag at 0.5: values 0.70, 0.71, 0.72 -> mean 0.71, half-width t(2) * 0.01 / sqrt(3)
    let c = d
        .cells
        .iter()
        .find(|c| c.method == "mag" && c.density == Some(0.5) && c.metric == Metric::Accuracy)
        .unwrap();
    assert!((c.interval.mean - 0.71).abs() < 1e-12);
    let want_h = 4.302652729911275 * 0.01 / 3f64.sqrt();
    assert!((c.interval.half_width.unwrap() - want_h).abs() < 1e-9);
    let verdict = |dens: f64, metric: Metric| {
        d.comparisons
            .iter()
            .find(|c| (c.density - dens).abs() < 1e-9 && c.metric == metric)
            .unwrap()
            .clone()
    };
    let w = verdict(0.5, Metric::Accuracy);
    assert_eq!(
        (w.bb.as_str(), w.baseline.as_str(), w.verdict),
        ("bb", "mag", Verdict::Win)
    );
    assert!((w.paired.interval.unwrap().mean - 0.02).abs() < 1e-12);
    assert_eq!(w.paired.keys, vec![0, 1, 2]);
    assert_eq!(verdict(0.25, Metric::Accuracy).verdict, Verdict::Tie);
    assert_eq!(verdict(0.1, Metric::Accuracy).verdict, Verdict::Loss);
    // tail accuracy (present in the records) is compared too, by default
    assert_eq!(verdict(0.1, Metric::TailAccuracy).verdict, Verdict::Loss);
    let md = std::fs::read_to_string(&m.markdown).unwrap();
    assert!(md.contains("**wins** at density 0.5"), "{md}");
    assert!(md.contains("**ties** at density 0.25"), "{md}");
    assert!(md.contains("**loses** at density 0.1"), "{md}");
    assert!(
        md.contains(
            "| 0.5 | accuracy | bb | 73.00 | mag | 71.00 | +2.00 [+2.00, +2.00] | 3 | win |"
        ),
        "{md}"
    );
    assert!(md.contains("Runs complete: **60 of 60**"), "{md}");
    assert!(t.path().join("report/summary.json").is_file());
    assert!(t.path().join("report/plots/digits-accuracy.svg").is_file());
    // the reference method (0.99 everywhere) is reported but never chosen as "best baseline"
    assert!(d
        .comparisons
        .iter()
        .all(|c| c.baseline == "mag" && c.bb == "bb"));
    assert!(md.contains("| tt | reference |"), "{md}");
    // every BB variant against the best baseline (one variant here: the same numbers)
    assert_eq!(d.variants.len(), d.comparisons.len());
    assert!(
        md.contains("**Each BB variant − the best baseline, accuracy"),
        "{md}"
    );
    assert!(md.contains("| bb | +2.00 [+2.00, +2.00] win |"), "{md}");
}

#[test]
fn a_merge_of_a_partly_done_sweep_says_what_is_missing() {
    let t = TempDir::new("partmerge");
    let g = grid();
    let fake = Fake::new(planted);
    let opts = RunOptions {
        shard: Some(Shard { index: 1, count: 2 }),
        quiet: true,
        ..Default::default()
    };
    run_sweep(&g, t.path(), &opts, &fake).unwrap();
    let m = merge(&g, t.path(), None).unwrap();
    assert_eq!(m.summary.complete, g.keys().len() / 2);
    assert_eq!(m.summary.missing.len(), g.keys().len() / 2);
    let md = std::fs::read_to_string(&m.markdown).unwrap();
    assert!(md.contains("## Missing runs"), "{md}");
    assert!(md.contains("30 missing"), "{md}");
    // a damaged record is reported by path instead of being skipped silently
    let k = collect(&g, t.path()).unwrap().records[0].key.clone();
    std::fs::write(t.path().join(k.rel_dir()).join("record.json"), "{").unwrap();
    let e = format!("{:#}", merge(&g, t.path(), None).unwrap_err());
    assert!(e.contains("record.json"), "{e}");
}

// ---- the statistics, against known cases -------------------------------------------------

#[test]
fn t_quantiles_match_published_tables() {
    for (df, q) in [
        (1.0, 12.706204736174698),
        (2.0, 4.302652729911275),
        (4.0, 2.7764451051977987),
        (9.0, 2.2621571627409915),
        (29.0, 2.045229642132703),
        (1000.0, 1.9623390808264078),
    ] {
        let got = student_t_quantile(0.975, df);
        assert!((got - q).abs() < 1e-9, "df {df}: {got} vs {q}");
    }
    assert!((student_t_quantile(0.025, 4.0) + 2.7764451051977987).abs() < 1e-9);
    assert!((student_t_quantile(0.95, 10.0) - 1.8124611228107341).abs() < 1e-9);
}

#[test]
fn the_interval_of_one_to_five_is_known() {
    // mean 3, sd sqrt(2.5), half-width t(0.975, 4) * sqrt(2.5 / 5)
    let iv = mean_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    assert_eq!(iv.n, 5);
    assert!((iv.mean - 3.0).abs() < 1e-15);
    assert!((iv.sd.unwrap() - 2.5f64.sqrt()).abs() < 1e-15);
    assert!((iv.half_width.unwrap() - 1.963243).abs() < 1e-6);
    assert!((iv.lo() - 1.036757).abs() < 1e-6 && (iv.hi() - 4.963243).abs() < 1e-6);
    let one = mean_ci95(&[0.7]).unwrap();
    assert_eq!((one.mean, one.half_width), (0.7, None));
    assert!(mean_ci95(&[]).is_none());
    assert!(mean_ci95(&[1.0, f64::NAN]).is_none());
}

#[test]
fn paired_differences_use_common_seeds_only() {
    let a = [(0, 0.80), (1, 0.82), (2, 0.78), (5, 0.9)];
    let b = [(2, 0.77), (0, 0.79), (1, 0.80), (7, 0.1)];
    let p = paired_differences(&a, &b).unwrap();
    assert_eq!(p.keys, vec![0, 1, 2]);
    let want = [0.01, 0.02, 0.01];
    for (d, w) in p.diffs.iter().zip(want) {
        assert!((d - w).abs() < 1e-12);
    }
    let iv = p.interval.unwrap();
    // mean 0.04/3, sd sqrt(1/3) * 0.01 -> half-width 4.3027 * 0.01 / 3
    assert!((iv.mean - 0.04 / 3.0).abs() < 1e-12);
    assert!((iv.half_width.unwrap() - 4.302652729911275 * 0.01 / 3.0).abs() < 1e-9);
    assert_eq!(Verdict::of(Some(&iv)), Verdict::Tie);
    assert!(paired_differences(&[(1, 0.0), (1, 1.0)], &b).is_err());
}

#[test]
fn macro_f1_pr_auc_and_buckets_on_hand_worked_cases() {
    // truth / predictions over 3 classes
    let truth = [0, 0, 0, 1, 1, 2];
    let pred = [0, 0, 1, 1, 2, 2];
    let c = Confusion::from_labels(3, &truth, &pred);
    assert!((c.accuracy() - 4.0 / 6.0).abs() < 1e-12);
    // class 0: p 1, r 2/3 -> 0.8; class 1: p 1/2, r 1/2 -> 0.5; class 2: p 1/2, r 1 -> 2/3
    assert!((c.macro_f1() - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    // a class with support that is never predicted scores 0, one without support is left out
    let c = Confusion::from_labels(4, &[0, 1], &[0, 0]);
    assert!((c.macro_f1() - (2.0 / 3.0 + 0.0) / 2.0).abs() < 1e-12);
    // AP: ranks + - + - -> 1/2 * 1 + 1/2 * 2/3
    let ap = average_precision(&[0.9, 0.8, 0.7, 0.6], &[true, false, true, false]).unwrap();
    assert!((ap - 5.0 / 6.0).abs() < 1e-12);
    // tied scores enter together: one threshold holding both positives and both negatives
    let ap = average_precision(&[0.5; 4], &[true, false, true, false]).unwrap();
    assert!((ap - 0.5).abs() < 1e-12);
    assert_eq!(average_precision(&[0.1], &[false]), None);
    // buckets: thirds by training count, ties to the lower class
    let b = Buckets::from_counts(&[100, 77, 60, 46, 36, 28, 22, 17, 13, 10]);
    assert_eq!(
        (b.head.clone(), b.tail.clone()),
        (vec![0, 1, 2], vec![7, 8, 9])
    );
    assert_eq!(b.mid, vec![3, 4, 5, 6]);
    let acc: Vec<f64> = (0..10).map(|c| c as f64 / 10.0).collect();
    let (h, m, t) = b.accuracy(&acc);
    assert!((h.unwrap() - 0.1).abs() < 1e-12 && (m.unwrap() - 0.45).abs() < 1e-12);
    assert!((t.unwrap() - 0.8).abs() < 1e-12);
    assert!(!Buckets::is_imbalanced(&[5, 5, 5]));
}

// ---- end to end with the real runner --------------------------------------------------------

fn ci_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps/ci-tiny.toml")
}

#[test]
fn the_ci_grid_runs_end_to_end_as_two_concurrent_shard_processes() {
    let data = TempDir::new("e2e-data");
    write_image_set(data.path(), "mnist", 110, 35);
    let out = TempDir::new("e2e-out");
    let bb = env!("CARGO_BIN_EXE_bb");
    let shard = |i: usize| {
        Command::new(bb)
            .arg("sweep")
            .arg(ci_tiny())
            .arg("--out")
            .arg(out.path())
            .arg("--data-dir")
            .arg(data.path())
            .args(["--shard", &format!("{i}/2"), "--quiet"])
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (shard(0), shard(1));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    // merge with the stand-alone command
    let m = Command::new(bb)
        .arg("merge")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let md = std::fs::read_to_string(out.path().join("summary/summary.md")).unwrap();
    assert!(md.contains("Runs complete: **8 of 8**"), "{md}");
    let cfg = sweep::load_from_out_dir(out.path()).unwrap();
    let col = collect(&cfg, out.path()).unwrap();
    assert_eq!(col.records.len(), 8);
    let mut by_key = BTreeMap::new();
    for r in &col.records {
        // matched density, reported per layer
        let d = r.key.density().unwrap();
        assert!(
            (r.achieved_density - d).abs() < 1e-3,
            "{}: {}",
            r.key.label(),
            r.achieved_density
        );
        assert!(r
            .layers
            .iter()
            .filter(|l| l.pruned)
            .all(|l| (l.achieved - d).abs() < 1e-3));
        assert_eq!(
            r.train_class_counts,
            vec![100, 77, 60, 46, 36, 28, 22, 17, 13, 10]
        );
        assert!(r.tail_accuracy.is_some() && r.entropy_bits.is_some());
        assert!(
            r.accuracy > 0.1,
            "{}: the planted patterns are learnable ({})",
            r.key.label(),
            r.accuracy
        );
        by_key.insert(r.key.clone(), r.accuracy);
        // the run folder is an ordinary `bb run` folder
        let dir = out.path().join(r.key.rel_dir());
        assert!(dir.join("config.toml").is_file() && dir.join("results.json").is_file());
    }
    // a second call finds everything done; the same seed gives the same result when rerun
    let again = Command::new(bb)
        .arg("sweep")
        .arg(ci_tiny())
        .arg("--out")
        .arg(out.path())
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("0 trained, 8 already complete"), "{text}");
    let k = col.records[0].key.clone();
    std::fs::remove_dir_all(out.path().join(k.rel_dir())).unwrap();
    let rerun = Command::new(bb)
        .arg("sweep")
        .arg(ci_tiny())
        .arg("--out")
        .arg(out.path())
        .arg("--data-dir")
        .arg(data.path())
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(rerun.status.success());
    let col2 = collect(&cfg, out.path()).unwrap();
    let r2 = col2.records.iter().find(|r| r.key == k).unwrap();
    assert_eq!(r2.accuracy, by_key[&k], "deterministic with a fixed seed");
}

#[test]
fn a_missing_data_folder_fails_before_training_and_says_how_to_fetch() {
    let empty = TempDir::new("nodata");
    let out = TempDir::new("nodata-out");
    let o = Command::new(env!("CARGO_BIN_EXE_bb"))
        .arg("sweep")
        .arg(ci_tiny())
        .arg("--out")
        .arg(out.path().join("o"))
        .arg("--data-dir")
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("scripts/fetch-data.sh") && err.contains("mnist"),
        "{err}"
    );
    assert!(
        !out.path().join("o").join("runs").exists(),
        "nothing trained"
    );
}
