//! `bb export`: the sparse file of a finished run reproduces the masked dense model, reads back
//! exactly, is the same bytes every time, and refuses corrupt or wrong files by name.

mod common;

use bb_tasks::cli_export::{export, load_run, locate_run, ExportArgs};
use bb_tasks::cli_run::{execute, prepare, ExperimentOutcome};
use bb_tasks::config::ExperimentConfig;
use bb_tasks::data::Dataset;
use bb_tasks::export::{Activation, SparseMlp, META_KEY};
use common::TempDir;
use dfdx::prelude::Cpu;
use safetensors::tensor::{SafeTensors, TensorView};
use std::fs;
use std::path::{Path, PathBuf};

/// A small xor experiment (BB with SP-out, BB with SP-in, and dense) that trains in seconds.
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
epochs = 3
batch_size = 32
lr = 0.01
[pruning.schedule]
warmup_steps = 6
refresh_every = 7
[pruning.policy]
kind = "balance"
beta = 0.3
target_density = 0.5
[[arms]]
name = "out"
[arms.pruning.actuator]
kind = "sp_out"
[[arms]]
name = "in"
[arms.pruning.actuator]
kind = "sp_in"
[[arms]]
name = "dense"
prune = false
"#;

/// Trains [`SMALL`] into `root/run` and returns the folder.
fn trained(root: &Path) -> PathBuf {
    let cfg = ExperimentConfig::from_toml(SMALL).unwrap();
    let dir = root.join("run");
    let prep = prepare(&cfg, &dir).unwrap();
    assert!(matches!(
        execute(&Cpu::default(), &prep, true, None).unwrap(),
        ExperimentOutcome::Done(_)
    ));
    dir
}

fn test_set() -> Dataset {
    let cfg = ExperimentConfig::from_toml(SMALL).unwrap();
    cfg.data.build(3).unwrap().test
}

fn args(run_dir: &Path, arm: &str, out: &Path) -> ExportArgs {
    ExportArgs {
        run_dir: run_dir.to_path_buf(),
        out: out.to_path_buf(),
        arm: Some(arm.to_string()),
        seed: None,
        verify: false,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exported_inference_matches_the_masked_dense_model_on_the_test_set() {
    let tmp = TempDir::new("export-match");
    let run = trained(tmp.path());
    let test = test_set();
    let dev = Cpu::default();
    for arm in ["out", "in", "dense"] {
        let out = tmp.path().join(format!("{arm}.safetensors"));
        let mut a = args(&run, arm, &out);
        a.verify = true;
        let summary = export(&a).unwrap();
        let v = summary.verification.clone().unwrap();
        assert_eq!(v.samples, test.len());
        assert!(v.max_abs_diff <= 1e-5, "{arm}: {v:?}");
        assert_eq!(v.disagreements, 0, "{arm}: {v:?}");

        // independent of the CLI's own check: reload both models and compare here
        let sparse = SparseMlp::load(&out).unwrap();
        let mut dense = load_run(&dev, &run.join(arm).join("seed-3")).unwrap();
        let want = dense.model.forward(&test.x, test.len()).unwrap().logits;
        let got = sparse.forward(&test.x, test.len()).unwrap();
        let diff = max_abs_diff(&want, &got);
        assert!(diff <= 1e-5, "{arm}: max |diff| {diff}");
        // logits that are not all alike, so the comparison means something
        let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.1, "{arm}: logits {spread}");

        let info = sparse.info();
        assert_eq!(info.widths, dense.model.widths());
        assert_eq!(info.activation, Activation::Relu);
        let src = info.source.as_ref().unwrap();
        assert_eq!((src.arm.as_str(), src.seed), (arm, 3));
        assert_eq!(src.steps, dense.result.steps);
        let edges: usize = info.widths.windows(2).map(|w| w[0] * w[1]).sum();
        assert_eq!(summary.edges, edges);
        match &dense.pruner {
            Some(p) => {
                // only the live edges are stored, exactly the pruner's masks
                for (l, layer) in sparse.layers().iter().enumerate() {
                    assert_eq!(layer.nnz(), p.mask(l).count(), "{arm} layer {l}");
                    assert_eq!(info.layers[l].nnz, layer.nnz());
                }
                assert!(
                    sparse.nnz() < edges * 9 / 10,
                    "{arm}: {} live",
                    sparse.nnz()
                );
            }
            None => assert_eq!(sparse.nnz(), edges),
        }
        // the per-row count of every layer matches the live weights of the dense model
        for (l, layer) in sparse.layers().iter().enumerate() {
            let (row_ptr, cols, _) = layer.parts();
            let inp = info.widths[l];
            for o in 0..layer.out() {
                let (s, e) = (row_ptr[o] as usize, row_ptr[o + 1] as usize);
                assert!(cols[s..e].windows(2).all(|c| c[0] < c[1]));
                for &c in &cols[s..e] {
                    assert!((c as usize) < inp);
                }
            }
        }

        if arm == "in" {
            // SP-in factors are in play and folded in: without them the outputs move
            let factors: Vec<f32> = (0..dense.model.num_layers())
                .filter_map(|l| dense.model.scale(l).map(<[f32]>::to_vec))
                .flatten()
                .collect();
            assert!(
                factors.iter().any(|&s| (s - 1.0).abs() > 1e-3),
                "the SP-in run should rescale"
            );
            assert!(info.layers.iter().any(|l| l.rescale_folded));
            for l in 0..dense.model.num_layers() {
                dense.model.set_scale(l, None).unwrap();
            }
            let unfolded = SparseMlp::from_model(&dense.model, dense.pruner.as_ref(), None)
                .unwrap()
                .forward(&test.x, test.len())
                .unwrap();
            assert!(
                max_abs_diff(&want, &unfolded) > 1e-3,
                "dropping the rescale should change the logits"
            );
        } else {
            assert!(info.layers.iter().all(|l| !l.rescale_folded));
        }

        // batches of one give the same logits as the whole set at once
        let k = *info.widths.last().unwrap();
        for i in [0, 7, test.len() - 1] {
            let x = &test.x[i * test.features..(i + 1) * test.features];
            let one = sparse.forward(x, 1).unwrap();
            assert!(max_abs_diff(&one, &want[i * k..(i + 1) * k]) <= 1e-5);
        }

        // the same run exports to the same bytes
        let again = tmp.path().join(format!("{arm}-again.safetensors"));
        export(&args(&run, arm, &again)).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
    }
}

/// Rewrites the tensors of a safetensors file, keeping its metadata.
fn rewrite(bytes: &[u8], edit: impl Fn(&str, &mut Vec<u8>)) -> Vec<u8> {
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let meta = header.metadata().clone();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let owned: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let mut data = v.data().to_vec();
            edit(&n, &mut data);
            (n, v.dtype(), v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, &meta).unwrap()
}

/// `bytes` with the one occurrence of `from` replaced by `to` (same length, so the header's
/// length prefix stays right).
fn replace_once(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{from} occurs {} times", at.len());
    let mut out = bytes.to_vec();
    out[at[0]..at[0] + to.len()].copy_from_slice(to.as_bytes());
    out
}

fn load_err(path: &Path) -> String {
    format!("{:#}", SparseMlp::load(path).unwrap_err())
}

#[test]
fn corrupt_or_wrong_files_give_an_error_naming_the_file() {
    let tmp = TempDir::new("export-bad");
    let run = trained(tmp.path());
    let good = tmp.path().join("good.safetensors");
    export(&args(&run, "in", &good)).unwrap();
    let bytes = fs::read(&good).unwrap();
    SparseMlp::load(&good).unwrap();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        (
            "not safetensors",
            b"hello, world".to_vec(),
            "not a safetensors",
        ),
        ("empty", Vec::new(), "not a safetensors"),
        (
            // a column index past the layer's inputs
            "column out of range",
            rewrite(&bytes, |n, d| {
                if n == "fc2.col_idx" {
                    d[0] = 0xff;
                    d[1] = 0xff;
                }
            }),
            "fc2",
        ),
        (
            "row pointers out of order",
            rewrite(&bytes, |n, d| {
                if n == "fc1.row_ptr" {
                    d[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                }
            }),
            "fc1",
        ),
        (
            "unknown activation",
            replace_once(&bytes, r#"activation\":\"relu"#, r#"activation\":\"gelu"#),
            "activation",
        ),
        (
            "newer version",
            replace_once(&bytes, r#"version\":1,"#, r#"version\":9,"#),
            "version",
        ),
    ];
    for (what, b, needle) in &cases {
        assert_ne!(b, &bytes, "{what}: the case must change the file");
        let p = tmp
            .path()
            .join(format!("{}.safetensors", what.replace(' ', "-")));
        fs::write(&p, b).unwrap();
        let msg = load_err(&p);
        assert!(msg.contains(&p.display().to_string()), "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
    }

    // a dense training checkpoint is a safetensors file, but not an export
    let ck = bb_tasks::trainer::latest_checkpoint(&run.join("in/seed-3"))
        .unwrap()
        .unwrap()
        .join("model.safetensors");
    let msg = load_err(&ck);
    assert!(msg.contains(&ck.display().to_string()), "{msg}");
    assert!(msg.contains(META_KEY) && msg.contains("bb export"), "{msg}");

    let missing = tmp.path().join("nope.safetensors");
    let msg = load_err(&missing);
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn the_run_is_found_from_the_experiment_folder_or_given_directly() {
    let tmp = TempDir::new("export-locate");
    let run = trained(tmp.path());
    // three runs: the arm must be chosen
    let msg = format!("{:#}", locate_run(&run, None, None).unwrap_err());
    assert!(
        msg.contains("3 runs") && msg.contains("--arm") && msg.contains("in/seed-3"),
        "{msg}"
    );
    let msg = format!("{:#}", locate_run(&run, Some("nope"), None).unwrap_err());
    assert!(
        msg.contains("no arm \"nope\"") && msg.contains("dense"),
        "{msg}"
    );
    let msg = format!("{:#}", locate_run(&run, Some("in"), Some(4)).unwrap_err());
    assert!(msg.contains("no seed 4"), "{msg}");
    assert_eq!(
        locate_run(&run, Some("in"), None).unwrap(),
        run.join("in/seed-3")
    );
    let direct = run.join("out/seed-3");
    assert_eq!(locate_run(&direct, None, None).unwrap(), direct);
    let msg = format!("{:#}", locate_run(&direct, Some("in"), None).unwrap_err());
    assert!(msg.contains("arm \"out\""), "{msg}");
    let msg = format!("{:#}", locate_run(tmp.path(), None, None).unwrap_err());
    assert!(msg.contains("not a run folder"), "{msg}");

    // an unfinished run is refused with a hint
    fs::remove_file(run.join("out/seed-3/final.json")).unwrap();
    let e = export(&args(&run, "out", &tmp.path().join("x.safetensors"))).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("final.json") && msg.contains("--resume"),
        "{msg}"
    );
    assert!(!tmp.path().join("x.safetensors").exists());

    // the program: a run folder given directly, checked on its test set
    let out = tmp.path().join("cli/in.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_bb"))
        .arg("export")
        .arg(run.join("in/seed-3"))
        .arg("--out")
        .arg(&out)
        .arg("--verify")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("200 test samples"), "{stdout}");
    assert!(stdout.contains("0 predictions differ"), "{stdout}");
    SparseMlp::load(&out).unwrap();
    // and its error path: the message names the folder
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_bb"))
        .arg("export")
        .arg(tmp.path().join("missing"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing: no such run folder"));
}
