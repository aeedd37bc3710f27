//! The seeded trainer: minibatches, the optimizer, the pruner on its schedule, evaluation every
//! epoch, `metrics.jsonl`, and checkpoints that resume to bit-identical results.
//!
//! One step, in order (each arrow is one call):
//! forward + backward ([`Mlp::train_step`]) -> `pruner.observe` (the activations of that same
//! forward pass) -> `pruner.mask_gradients` -> optimizer update -> `pruner.step` (refreshes on
//! schedule, editing the weights in place) -> `pruner.apply_mask` -> SP-in factors ->
//! [`Mlp::sync_to_device`].
//!
//! A run folder holds `metrics.jsonl` (one line per epoch), `refreshes.jsonl` (one line per
//! refresh), `checkpoints/` and, once finished, `final.json`.

use crate::checkpoint::write_checkpoint;
use crate::config::RunSpec;
use crate::data::{Dataset, Split};
use crate::io::write_jsonl;
use crate::io::{write_atomic, NamedTensor, TensorFile};
use crate::measure::{self, GroupTraffic, LayerStats, PopulationStats};
use crate::model::Mlp;
use crate::optim::Optimizer;
use anyhow::{anyhow, bail, ensure, Context, Result};
use bb_actuators::BitMask;
use bb_core::{Activations, Pruner, RefreshReport};
use dfdx::prelude::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Instant;

/// Metrics of one epoch (a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Completed optimizer steps.
    pub step: u64,
    /// Learning rate of the epoch's last step.
    pub lr: f32,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Mean cross-entropy on the evaluation set.
    pub test_loss: f64,
    /// Accuracy on the evaluation set.
    pub test_acc: f64,
    /// Recall on the flagged evaluation samples (DNF: rare-decided positives).
    pub flagged_recall: Option<f64>,
    /// Live edges / edges over the pruned layers (1 without a pruner).
    pub density: f64,
    /// Refreshes so far.
    pub refreshes: usize,
    /// Mean churn of the epoch's refreshes.
    pub churn: Option<f64>,
    /// Seconds since the run started (not part of the reproducible results).
    pub wall_s: f64,
}

/// A refresh, condensed (a line of `refreshes.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshLine {
    /// Epoch it happened in.
    pub epoch: usize,
    /// The engine's report.
    pub report: RefreshReport,
}

/// Final measurements of a run (`final.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Arm name.
    pub arm: String,
    /// Seed.
    pub seed: u64,
    /// MLP widths.
    pub widths: Vec<usize>,
    /// Optimizer steps.
    pub steps: u64,
    /// Final evaluation accuracy.
    pub test_acc: f64,
    /// Final evaluation loss.
    pub test_loss: f64,
    /// Accuracy per class.
    pub per_class_acc: Vec<f64>,
    /// Recall on the flagged evaluation samples.
    pub flagged_recall: Option<f64>,
    /// Live edges / edges over the pruned layers.
    pub density: f64,
    /// Per-layer sparsity.
    pub layers: Vec<LayerStats>,
    /// Per-population activity measurements (input and hidden layers).
    pub populations: Vec<PopulationStats>,
    /// Traffic of the input feature groups.
    pub input_traffic: Vec<GroupTraffic>,
    /// Refreshes run.
    pub refreshes: usize,
    /// Training wall time, seconds (not reproducible).
    pub wall_s: f64,
}

/// Everything a checkpoint stores besides tensors and the pruner.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    arm: String,
    seed: u64,
    epoch: usize,
    step: u64,
    optimizer_steps: u64,
    shuffle_rng: ChaCha8Rng,
    metrics: Vec<EpochMetrics>,
    refreshes: Vec<RefreshLine>,
    last_targets: Vec<Option<f64>>,
    wall_s: f64,
}

/// How a run is driven.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Stop after this epoch (a checkpoint is written there), to be resumed later.
    pub stop_after_epoch: Option<usize>,
    /// Called after every step with the number of steps done in this call.
    pub progress: Option<indicatif::ProgressBar>,
}

/// What a call to [`train`] ended with.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The run finished; `final.json` is written.
    Finished(Box<RunResult>),
    /// Stopped early on request, with a checkpoint at this epoch.
    Stopped(usize),
}

/// The checkpoint folder's pointer file.
pub use crate::checkpoint::latest_checkpoint;

/// Loads the final pruner of a finished or checkpointed run (for comparisons).
pub fn load_pruner(checkpoint: &Path) -> Result<Option<Pruner>> {
    let p = checkpoint.join("pruner.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(Some(
        Pruner::from_json(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?,
    ))
}

/// Reads the model of a checkpoint folder (`model.safetensors`) for an MLP of `widths`.
pub fn load_model<D: Device<f32>>(dev: &D, checkpoint: &Path, widths: &[usize]) -> Result<Mlp<D>> {
    let path = checkpoint.join("model.safetensors");
    let mut mf = TensorFile::read(&path)?;
    let (mut ws, mut bs) = (Vec::new(), Vec::new());
    for l in 0..widths.len().saturating_sub(1) {
        let name = crate::model::layer_name(l);
        for (suffix, out) in [("weight", &mut ws), ("bias", &mut bs)] {
            out.push(
                mf.take(&format!("{name}.{suffix}"))
                    .with_context(|| format!("in {}", path.display()))?,
            );
        }
    }
    Mlp::from_host(dev, widths, ws, bs).with_context(|| format!("in {}", path.display()))
}

/// Reads a run's `metrics.jsonl`.
pub fn read_metrics(dir: &Path) -> Result<Vec<EpochMetrics>> {
    let p = dir.join("metrics.jsonl");
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line in {}", p.display())))
        .collect()
}

struct Evaluation {
    loss: f64,
    acc: f64,
    per_class: Vec<f64>,
    flagged_recall: Option<f64>,
    hidden: Vec<Vec<f32>>,
}

fn evaluate<D: Device<f32>>(
    model: &Mlp<D>,
    data: &Dataset,
    keep_hidden: bool,
) -> Result<Evaluation> {
    const CHUNK: usize = 1024;
    let k = data.classes;
    let mut loss = 0.0;
    let mut correct = vec![0usize; k];
    let mut count = vec![0usize; k];
    let (mut fl_hit, mut fl_n) = (0usize, 0usize);
    let mut hidden: Vec<Vec<f32>> = vec![Vec::new(); model.num_layers() - 1];
    let mut start = 0;
    while start < data.len() {
        let end = (start + CHUNK).min(data.len());
        let b = end - start;
        let out = model.forward(&data.x[start * data.features..end * data.features], b)?;
        for r in 0..b {
            let z = &out.logits[r * k..(r + 1) * k];
            let y = data.y[start + r];
            let mx = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = mx + z.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            loss += lse - z[y] as f64;
            // argmax, ties to the lower class
            let pred = (0..k).fold(0, |best, c| if z[c] > z[best] { c } else { best });
            count[y] += 1;
            correct[y] += (pred == y) as usize;
            if data.flagged.get(start + r).copied().unwrap_or(false) {
                fl_n += 1;
                fl_hit += (pred == y) as usize;
            }
        }
        if keep_hidden {
            for (h, o) in hidden.iter_mut().zip(out.hidden) {
                h.extend_from_slice(&o);
            }
        }
        start = end;
    }
    let n = data.len() as f64;
    Ok(Evaluation {
        loss: loss / n,
        acc: correct.iter().sum::<usize>() as f64 / n,
        per_class: (0..k)
            .map(|c| correct[c] as f64 / count[c].max(1) as f64)
            .collect(),
        flagged_recall: (fl_n > 0).then(|| fl_hit as f64 / fl_n as f64),
        hidden,
    })
}

fn save_checkpoint<D: Device<f32>>(
    dir: &Path,
    model: &Mlp<D>,
    opt: &Optimizer,
    pruner: Option<&Pruner>,
    state: &TrainState,
) -> Result<()> {
    // one metadata key, so the file's bytes do not depend on hash-map order
    let meta = HashMap::from([(
        "checkpoint".to_string(),
        serde_json::json!({
            "epoch": state.epoch,
            "step": state.step,
            "widths": model.widths(),
        })
        .to_string(),
    )]);
    let mut tensors = Vec::new();
    for l in 0..model.num_layers() {
        let (o, i) = (model.widths()[l + 1], model.widths()[l]);
        tensors.push(NamedTensor {
            name: format!("{}.weight", crate::model::layer_name(l)),
            shape: vec![o, i],
            data: model.weights(l).to_vec(),
        });
        tensors.push(NamedTensor {
            name: format!("{}.bias", crate::model::layer_name(l)),
            shape: vec![o],
            data: model.bias(l).to_vec(),
        });
    }
    write_checkpoint(dir, state.epoch, &tensors, &meta, opt, pruner, state)
}

/// Trains one run in `dir` (created if needed), resuming from its latest checkpoint if there is
/// one. `split` must be the data of `spec.seed`.
pub fn train<D: Device<f32>>(
    dev: &D,
    spec: &RunSpec,
    split: &Split,
    dir: &Path,
    opts: &RunOptions,
) -> Result<RunOutcome> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let widths = &spec.widths;
    let n_layers = widths.len() - 1;
    let t = &spec.train;
    let n_train = split.train.len();
    ensure!(
        split.train.features == widths[0] && split.train.classes == widths[n_layers],
        "data does not match the model widths {widths:?}"
    );
    let steps_per_epoch = t.steps_per_epoch(n_train);
    let mut model = Mlp::new(dev, widths, spec.seed)?;
    let sizes: Vec<usize> = (0..n_layers)
        .flat_map(|l| [widths[l] * widths[l + 1], widths[l + 1]])
        .collect();
    let mut opt = Optimizer::new(t.optimizer, &sizes);
    let mut pruner = spec.pruner()?;
    let mut state = TrainState {
        arm: spec.arm.clone(),
        seed: spec.seed,
        epoch: 0,
        step: 0,
        optimizer_steps: 0,
        shuffle_rng: ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5348_5546),
        metrics: Vec::new(),
        refreshes: Vec::new(),
        last_targets: vec![None; n_layers],
        wall_s: 0.0,
    };
    if let Some(ck) = latest_checkpoint(dir)? {
        let st: TrainState = serde_json::from_str(
            &fs::read_to_string(ck.join("state.json")).context("checkpoint: state.json")?,
        )
        .context("checkpoint: state.json")?;
        ensure!(
            st.arm == spec.arm && st.seed == spec.seed,
            "checkpoint {} belongs to arm {:?} seed {}, not arm {:?} seed {}",
            ck.display(),
            st.arm,
            st.seed,
            spec.arm,
            spec.seed
        );
        model = load_model(dev, &ck, widths)?;
        let mut of = TensorFile::read(&ck.join("optimizer.safetensors"))?;
        opt.restore(st.optimizer_steps, |n| of.take(n))?;
        if pruner.is_some() {
            let p = load_pruner(&ck)?
                .ok_or_else(|| anyhow!("checkpoint {} has no pruner.json", ck.display()))?;
            ensure!(
                p.step_count() == st.step,
                "checkpoint {}: pruner is at step {}, trainer at step {}",
                ck.display(),
                p.step_count(),
                st.step
            );
            for l in 0..n_layers {
                model.set_scale(l, p.scale(l))?;
            }
            pruner = Some(p);
        }
        state = st;
    }
    let start = Instant::now();
    let wall0 = state.wall_s;
    let (mut xb, mut yb) = (Vec::new(), Vec::new());
    let mut order: Vec<usize> = (0..n_train).collect();
    while state.epoch < t.epochs {
        if opts.stop_after_epoch.is_some_and(|s| state.epoch >= s) {
            return Ok(RunOutcome::Stopped(state.epoch));
        }
        let epoch = state.epoch + 1;
        order.sort_unstable();
        order.shuffle(&mut state.shuffle_rng);
        let mut loss_sum = 0.0;
        let mut lr = t.lr;
        let mut churn = Vec::new();
        for (bi, chunk) in order.chunks(t.batch_size).enumerate() {
            debug_assert!(bi < steps_per_epoch);
            let b = chunk.len();
            split.train.gather(chunk, &mut xb, &mut yb);
            lr = t.lr_schedule.rate(t.lr, state.step, spec.total_steps);
            let out = train_step(&mut model, &mut opt, pruner.as_mut(), &xb, &yb, b, lr)?;
            state.step += 1;
            ensure!(
                out.loss.is_finite(),
                "training diverged at step {} (loss {})",
                state.step,
                out.loss
            );
            loss_sum += out.loss as f64;
            if let Some(r) = out.refresh {
                for lrep in &r.layers {
                    if let Some(l) =
                        (0..n_layers).find(|&l| crate::model::layer_name(l) == lrep.layer)
                    {
                        state.last_targets[l] = lrep.target_density;
                    }
                }
                churn.push(
                    r.layers.iter().map(|l| l.churn).sum::<f64>() / r.layers.len().max(1) as f64,
                );
                state.refreshes.push(RefreshLine { epoch, report: r });
            }
            if let Some(pb) = &opts.progress {
                pb.inc(1);
            }
        }
        state.optimizer_steps = opt.steps();
        let ev = evaluate(&model, &split.test, false)?;
        state.epoch = epoch;
        state.wall_s = wall0 + start.elapsed().as_secs_f64();
        state.metrics.push(EpochMetrics {
            epoch,
            step: state.step,
            lr,
            train_loss: loss_sum / steps_per_epoch as f64,
            test_loss: ev.loss,
            test_acc: ev.acc,
            flagged_recall: ev.flagged_recall,
            density: pruner.as_ref().map_or(1.0, |p| p.density()),
            refreshes: state.refreshes.len(),
            churn: (!churn.is_empty()).then(|| churn.iter().sum::<f64>() / churn.len() as f64),
            wall_s: state.wall_s,
        });
        write_jsonl(&dir.join("metrics.jsonl"), &state.metrics)?;
        write_jsonl(&dir.join("refreshes.jsonl"), &state.refreshes)?;
        let stop_here = opts.stop_after_epoch == Some(epoch);
        let periodic = t.checkpoint_every > 0 && epoch.is_multiple_of(t.checkpoint_every);
        if periodic || stop_here || epoch == t.epochs {
            save_checkpoint(dir, &model, &opt, pruner.as_ref(), &state)?;
        }
        if stop_here && epoch < t.epochs {
            return Ok(RunOutcome::Stopped(epoch));
        }
    }
    let result = finish(&model, pruner.as_ref(), split, &state, spec)?;
    write_atomic(
        &dir.join("final.json"),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    Ok(RunOutcome::Finished(Box::new(result)))
}

/// What one training step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Mean cross-entropy of the batch (before the update).
    pub loss: f32,
    /// The weight gradients of the batch, `[out, in]` per layer, dead edges included (the
    /// update takes theirs as zero).
    pub grad_w: Vec<Vec<f32>>,
    /// The refresh that ran after this step, if any.
    pub refresh: Option<RefreshReport>,
}

/// One training step on a batch: forward + backward, the pruner observes the activations of
/// that forward pass, the optimizer updates the host parameters (taking dead edges'
/// gradients as zero), the pruner counts the step (refreshing on schedule, which edits the
/// weights in place), the mask is re-applied, the SP-in factors are set, and the device
/// tensors are updated in place.
pub fn train_step<D: Device<f32>>(
    model: &mut Mlp<D>,
    opt: &mut Optimizer,
    mut pruner: Option<&mut Pruner>,
    x: &[f32],
    y: &[usize],
    batch: usize,
    lr: f32,
) -> Result<StepReport> {
    let widths = model.widths().to_vec();
    let n_layers = widths.len() - 1;
    let out = match pruner.as_deref_mut() {
        // the pruner observes the activations while the backward pass runs
        Some(p) => model.train_step_observed(x, y, batch, |hidden| {
            p.observe("input", Activations::batch_major(x, batch, widths[0]))?;
            for (h, acts) in hidden.iter().enumerate() {
                p.observe(
                    &crate::model::layer_name(h),
                    Activations::batch_major(acts, batch, widths[h + 1]),
                )?;
            }
            Ok(())
        })?,
        None => model.train_step_with(x, y, batch, false)?,
    };
    {
        // The update takes the dead edges' gradients as zero and zeroes their values in the
        // same pass (the pruner's `mask_gradients` and `apply_mask` in one).
        let (hw, hb) = model.host_params_mut();
        let mut params: Vec<&mut [f32]> = Vec::with_capacity(2 * n_layers);
        for (w, b) in hw.iter_mut().zip(hb.iter_mut()) {
            params.push(w);
            params.push(b);
        }
        let mut grads: Vec<&[f32]> = Vec::with_capacity(2 * n_layers);
        for (w, b) in out.grad_w.iter().zip(&out.grad_b) {
            grads.push(w);
            grads.push(b);
        }
        match pruner.as_deref() {
            Some(p) => {
                ensure!(
                    p.topology().layers.len() == n_layers,
                    "pruner has {} layers, the model {n_layers}",
                    p.topology().layers.len()
                );
                for l in 0..n_layers {
                    let m = p.mask(l);
                    ensure!(
                        (m.rows(), m.cols()) == (widths[l + 1], widths[l]),
                        "{}: the pruner's mask is {}x{}, the layer's weights {}x{}",
                        crate::model::layer_name(l),
                        m.rows(),
                        m.cols(),
                        widths[l + 1],
                        widths[l]
                    );
                }
                let live: Vec<Option<&BitMask>> = (0..n_layers)
                    .flat_map(|l| [Some(p.mask(l)), None])
                    .collect();
                opt.update_masked(&mut params, &grads, lr, &live);
            }
            None => opt.update(&mut params, &grads, lr),
        }
    }
    let mut refresh = None;
    if let Some(p) = pruner {
        let (hw, _) = model.host_params_mut();
        {
            let mut ws: Vec<&mut [f32]> = hw.iter_mut().map(|w| w.as_mut_slice()).collect();
            // The update left the gradients as they were: dense, dead edges included.
            let gs: Option<Vec<&[f32]>> = p
                .needs_gradients()
                .then(|| out.grad_w.iter().map(|v| v.as_slice()).collect());
            refresh = p.step(&mut ws, gs.as_deref())?;
        }
        if refresh.is_some() {
            // the masks changed: the edges that died were zeroed by the refresh; this keeps
            // every dead value at zero whatever the refresh did
            for (l, w) in hw.iter_mut().enumerate() {
                p.apply_mask(l, w)?;
            }
        }
        for l in 0..n_layers {
            model.set_scale(l, p.scale(l))?;
        }
    }
    model.sync_to_device();
    Ok(StepReport {
        loss: out.loss,
        grad_w: out.grad_w,
        refresh,
    })
}

fn finish<D: Device<f32>>(
    model: &Mlp<D>,
    pruner: Option<&Pruner>,
    split: &Split,
    state: &TrainState,
    spec: &RunSpec,
) -> Result<RunResult> {
    let widths = model.widths();
    let ev = evaluate(model, &split.test, true)?;
    let mut populations = vec![measure::population_stats(pruner, 0, widths, &split.test.x)];
    for (h, acts) in ev.hidden.iter().enumerate() {
        populations.push(measure::population_stats(pruner, h + 1, widths, acts));
    }
    let input_traffic = measure::group_traffic(&populations[0], &split.features.group);
    let Some(last) = state.metrics.last() else {
        bail!("run {} seed {} has no epochs", spec.arm, spec.seed);
    };
    Ok(RunResult {
        arm: spec.arm.clone(),
        seed: spec.seed,
        widths: widths.to_vec(),
        steps: state.step,
        test_acc: ev.acc,
        test_loss: ev.loss,
        per_class_acc: ev.per_class,
        flagged_recall: ev.flagged_recall,
        density: last.density,
        layers: measure::layer_stats(pruner, widths, &state.last_targets),
        populations,
        input_traffic,
        refreshes: state.refreshes.len(),
        wall_s: state.wall_s,
    })
}
