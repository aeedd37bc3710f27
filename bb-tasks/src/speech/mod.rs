//! The speech-recognition stand-in: spoken-command classification with a small Transformer
//! encoder, BB on its feed-forward layers, accuracy overall and per head / mid / tail word
//! bucket.
//!
//! **This is a stand-in.** No speech corpus (LibriSpeech, Speech Commands) can be had offline
//! (DATA.md), so the paper's ASR experiment (an encoder-decoder Transformer, WER with
//! tail-word buckets) is replaced by keyword classification on words synthesized with
//! Debian's `espeak-ng` and `flite` ([`synth`]): Zipf-distributed training counts give the
//! head / mid / tail buckets, whole voices are held out for test, both synthesizers are mixed
//! (a model trained on one alone fails on the other). Each training clip gets `augment.copies`
//! noisy, time-shifted versions per seed (white noise at a uniform SNR in `augment.snr_db`,
//! a shift of up to `augment.shift_ms`); each test clip one fixed version, the same for every
//! seed and method.
//!
//! Features: 40 log-mel bands every 10 ms ([`mel`]), normalized per band with the training
//! set's statistics, `model.patch` frames stacked into one token. Model: [`net::Encoder`].
//! BB acts on the FFN linears of every block: SP-in on the first projection sets a hidden
//! unit's fan-in, SP-out on the second its fan-out (an arm picks the actuator, also per layer).
//! Every method prunes both projections to the same density, so methods are compared at
//! matched sparsity.

pub mod cli;
pub mod mel;
pub mod net;
pub mod synth;

use crate::config::TrainConfig;
use crate::convkit::{Ctx, ParamId, ParamStore, Tap};
use crate::convrun::{self, ArmSpec, ConvRunResult, ConvRunSpec, ConvTask};
use crate::model::contiguous_cross_entropy;
use anyhow::{ensure, Result};
use bb_core::Topology;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use mel::{LogMel, MelConfig};
use net::{Encoder, EncoderConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use synth::{Corpus, CorpusSpec, Source, Split, Synth};

fn d_snr() -> [f64; 2] {
    [0.0, 20.0]
}
fn d_shift() -> f64 {
    100.0
}
fn d_copies() -> usize {
    2
}
fn d_eval_subset() -> usize {
    256
}

/// The `[augment]` table: noise and time shifts, drawn from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// SNR range `[lo, hi]` in dB of the added white noise (uniform).
    #[serde(default = "d_snr")]
    pub snr_db: [f64; 2],
    /// Largest time shift, ms (uniform in +-, zero fill).
    #[serde(default = "d_shift")]
    pub shift_ms: f64,
    /// Augmented versions of each training clip.
    #[serde(default = "d_copies")]
    pub copies: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            snr_db: d_snr(),
            shift_ms: d_shift(),
            copies: d_copies(),
        }
    }
}

/// A speech experiment (`task = "speech"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeechConfig {
    /// Name (run folder prefix).
    pub name: String,
    /// Always `"speech"`.
    pub task: String,
    /// One line for `bb presets`.
    #[serde(default)]
    pub description: String,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Folder holding `speech/` (default: see [`crate::realdata::data_dir`]).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Test clips used to measure activity (entropy, decorrelation, balance).
    #[serde(default = "d_eval_subset")]
    pub eval_subset: usize,
    /// The corpus.
    pub data: CorpusSpec,
    /// Noise and shifts.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Log-mel features.
    #[serde(default)]
    pub features: MelConfig,
    /// The encoder.
    #[serde(default)]
    pub model: EncoderConfig,
    /// Training.
    pub train: TrainConfig,
    /// Engine config shared by the arms.
    #[serde(default)]
    pub pruning: toml::Table,
    /// Compared methods.
    pub arms: Vec<ArmSpec>,
}

impl SpeechConfig {
    /// Parses a TOML config (unknown or missing fields are errors naming the field).
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = convrun::parse(text, "experiment config")?;
        ensure!(
            c.task == "speech",
            "task must be \"speech\" for this config, got {:?}",
            c.task
        );
        Ok(c)
    }

    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        convrun::validate_common(&self.name, &self.seeds, &self.train, &self.arms)?;
        self.data.validate()?;
        self.features.validate()?;
        self.model.validate()?;
        ensure!(
            self.features.sample_rate == synth::RATE,
            "features.sample_rate must be {} (the corpus rate)",
            synth::RATE
        );
        let a = &self.augment;
        ensure!(
            a.snr_db[0].is_finite() && a.snr_db[0] <= a.snr_db[1] && a.snr_db[1] <= 200.0,
            "augment.snr_db must be [lo, hi] with lo <= hi <= 200"
        );
        ensure!(
            a.shift_ms >= 0.0 && a.shift_ms < self.data.clip_ms as f64 / 2.0,
            "augment.shift_ms must be in [0, data.clip_ms / 2)"
        );
        ensure!(a.copies >= 1, "augment.copies must be >= 1");
        ensure!(self.eval_subset >= 1, "eval_subset must be >= 1");
        let frames = self.features.frames(self.data.clip_samples());
        ensure!(
            frames / self.model.patch >= 1,
            "model.patch ({}) is longer than the {frames} frames of a clip",
            self.model.patch
        );
        Ok(())
    }

    /// The corpus folder.
    pub fn corpus_dir(&self) -> PathBuf {
        self.data
            .cache_dir(&crate::realdata::data_dir(self.data_dir.as_deref()))
    }

    /// Loads (or, for tones, generates) the corpus.
    pub fn load_corpus(&self) -> Result<Corpus> {
        synth::load(&self.data, &self.corpus_dir())
    }
}

/// Adds a time shift and white noise to a clip (see [`AugmentConfig`]).
pub fn augment(x: &[f32], cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = x.len();
    let max = (cfg.shift_ms * synth::RATE as f64 / 1000.0).round() as i64;
    let s = if max > 0 {
        rng.gen_range(-max..=max)
    } else {
        0
    };
    let mut y = vec![0f32; n];
    for (i, v) in y.iter_mut().enumerate() {
        let j = i as i64 - s;
        if j >= 0 && (j as usize) < n {
            *v = x[j as usize];
        }
    }
    let p: f64 = y.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n.max(1) as f64;
    let snr = rng.gen_range(cfg.snr_db[0]..=cfg.snr_db[1]);
    let sd = (p / 10f64.powf(snr / 10.0)).sqrt();
    for v in &mut y {
        // Box-Muller
        let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
        let g = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        *v += (sd * g) as f32;
    }
    y
}

/// The features of one seed.
#[derive(Debug, Clone)]
pub struct SpeechData {
    /// Words.
    pub words: Vec<String>,
    /// Training clips per word (before augmentation).
    pub train_counts: Vec<usize>,
    /// Bucket of each word: 0 head, 1 mid, 2 tail.
    pub buckets: Vec<usize>,
    /// Tokens per sample.
    pub tokens: usize,
    /// Features per token.
    pub token_dim: usize,
    /// Training samples `[n, tokens·token_dim]`.
    pub train_x: Vec<f32>,
    /// Their words.
    pub train_y: Vec<usize>,
    /// Test samples.
    pub test_x: Vec<f32>,
    /// Their words.
    pub test_y: Vec<usize>,
    /// Voices: (synthesizer, training voices, held-out voices).
    pub voices: Vec<(String, usize, usize)>,
}

impl SpeechData {
    /// Everything but the feature arrays (which are emptied; the labels stay).
    pub fn meta(&self) -> SpeechData {
        SpeechData {
            words: self.words.clone(),
            train_counts: self.train_counts.clone(),
            buckets: self.buckets.clone(),
            tokens: self.tokens,
            token_dim: self.token_dim,
            train_x: Vec::new(),
            train_y: self.train_y.clone(),
            test_x: Vec::new(),
            test_y: self.test_y.clone(),
            voices: self.voices.clone(),
        }
    }

    /// Values per sample.
    pub fn sample_len(&self) -> usize {
        self.tokens * self.token_dim
    }
}

/// Builds the features of `seed` from a corpus (see the module docs).
pub fn build_data(cfg: &SpeechConfig, corpus: &Corpus, seed: u64) -> Result<SpeechData> {
    let mel = LogMel::new(&cfg.features)?;
    let plan = &corpus.plan;
    let m = cfg.features.n_mels;
    let frames = cfg.features.frames(cfg.data.clip_samples());
    let patch = cfg.model.patch;
    let tokens = frames / patch;
    let keep = tokens * patch * m;
    let train: Vec<(usize, usize)> = plan
        .clips
        .iter()
        .enumerate()
        .filter(|(_, c)| c.split == Split::Train)
        .flat_map(|(i, _)| (0..cfg.augment.copies).map(move |c| (i, c)))
        .collect();
    let test: Vec<usize> = (0..plan.clips.len())
        .filter(|&i| plan.clips[i].split == Split::Test)
        .collect();
    let feat = |i: usize, rng_seed: u64| -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let y = augment(&corpus.audio[i], &cfg.augment, &mut rng);
        let mut f = mel.compute(&y);
        f.truncate(keep);
        f
    };
    let mix = |a: u64, b: u64, c: u64| {
        a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ c
    };
    let mut train_x: Vec<f32> = train
        .par_iter()
        .flat_map_iter(|&(i, c)| feat(i, mix(seed + 1, i as u64, c as u64)))
        .collect();
    let mut test_x: Vec<f32> = test
        .par_iter()
        .flat_map_iter(|&i| feat(i, mix(0x7465_7374, i as u64, 0)))
        .collect();
    ensure!(!train.is_empty(), "the corpus has no training clips");
    ensure!(!test.is_empty(), "the corpus has no test clips");
    // per-band standardisation with the training statistics
    let mut sum = vec![0f64; m];
    let mut sq = vec![0f64; m];
    for row in train_x.chunks_exact(m) {
        for (j, &v) in row.iter().enumerate() {
            sum[j] += v as f64;
            sq[j] += (v as f64).powi(2);
        }
    }
    let cnt = (train_x.len() / m) as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / cnt) as f32).collect();
    let inv: Vec<f32> = sum
        .iter()
        .zip(&sq)
        .map(|(s, q)| {
            let var = (q / cnt - (s / cnt).powi(2)).max(1e-8);
            (1.0 / var.sqrt()) as f32
        })
        .collect();
    for x in [&mut train_x, &mut test_x] {
        for row in x.chunks_exact_mut(m) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - mean[j]) * inv[j];
            }
        }
    }
    let mut voices = Vec::new();
    for s in [Synth::Espeak, Synth::Flite, Synth::Tones] {
        let of: Vec<&synth::Voice> = plan.voices.iter().filter(|v| v.synth == s).collect();
        if !of.is_empty() {
            let h = of.iter().filter(|v| v.heldout).count();
            let name = match s {
                Synth::Espeak => "espeak-ng",
                Synth::Flite => "flite",
                Synth::Tones => "tones",
            };
            voices.push((name.to_string(), of.len() - h, h));
        }
    }
    Ok(SpeechData {
        words: plan.words.clone(),
        train_counts: plan.train_counts.clone(),
        buckets: plan.buckets(),
        tokens,
        token_dim: patch * m,
        train_y: train.iter().map(|&(i, _)| plan.clips[i].word).collect(),
        train_x,
        test_y: test.iter().map(|&i| plan.clips[i].word).collect(),
        test_x,
        voices,
    })
}

/// Accuracy overall and per bucket from predictions.
pub fn bucket_accuracy(
    pred: &[usize],
    truth: &[usize],
    buckets: &[usize],
) -> BTreeMap<String, f64> {
    let mut hit = [0usize; 3];
    let mut all = [0usize; 3];
    for (&p, &y) in pred.iter().zip(truth) {
        let b = buckets.get(y).copied().unwrap_or(0).min(2);
        all[b] += 1;
        if p == y {
            hit[b] += 1;
        }
    }
    let n: usize = all.iter().sum();
    let mut m = BTreeMap::new();
    if n > 0 {
        m.insert(
            "accuracy".to_string(),
            hit.iter().sum::<usize>() as f64 / n as f64,
        );
    }
    for (b, name) in ["acc_head", "acc_mid", "acc_tail"].iter().enumerate() {
        if all[b] > 0 {
            m.insert(name.to_string(), hit[b] as f64 / all[b] as f64);
        }
    }
    m
}

const EVAL_CHUNK: usize = 256;

/// The task for one seed.
#[derive(Debug)]
pub struct SpeechTask {
    cfg: SpeechConfig,
    data: SpeechData,
    dev: Cpu,
}

impl SpeechTask {
    /// The task with its features for `seed`.
    pub fn new(cfg: &SpeechConfig, corpus: &Corpus, seed: u64, dev: &Cpu) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            data: build_data(cfg, corpus, seed)?,
            dev: dev.clone(),
        })
    }

    /// The data.
    pub fn data(&self) -> &SpeechData {
        &self.data
    }

    fn batch_input(&self, x: &[f32], idx: &[usize]) -> Tensor<(usize, usize), f32, Cpu> {
        let l = self.data.sample_len();
        let mut v = Vec::with_capacity(idx.len() * l);
        for &i in idx {
            v.extend_from_slice(&x[i * l..(i + 1) * l]);
        }
        self.dev
            .tensor_from_vec(v, (idx.len() * self.data.tokens, self.data.token_dim))
    }

    /// Predictions on the test set, and the taps of its first `tap` samples.
    fn predict(
        &self,
        m: &Encoder,
        st: &ParamStore,
        tap: Option<usize>,
    ) -> Result<(Vec<usize>, Vec<Tap>)> {
        let n = self.data.test_y.len();
        let k = m.classes;
        let mut pred = Vec::with_capacity(n);
        let taps = Ctx::eval_in_chunks(n, EVAL_CHUNK, tap, |_, idx, ctx| {
            let x = self.batch_input(&self.data.test_x, idx);
            let logits = m.forward(st, x, idx.len(), ctx)?.as_vec();
            pred.extend(logits.chunks_exact(k).map(crate::stats::argmax));
            Ok(())
        })?;
        Ok((pred, taps))
    }
}

impl ConvTask for SpeechTask {
    type Model = Encoder;

    fn n_train(&self) -> usize {
        self.data.train_y.len()
    }

    fn build(&self, store: &mut ParamStore, seed: u64) -> Result<Encoder> {
        Encoder::new(
            &self.cfg.model,
            store,
            self.data.tokens,
            self.data.token_dim,
            self.data.words.len(),
            seed,
        )
    }

    fn topology(&self, m: &Encoder) -> Topology {
        m.topology()
    }

    fn layer_weights(&self, m: &Encoder) -> Vec<ParamId> {
        m.layer_weights()
    }

    fn train_batch(
        &self,
        m: &Encoder,
        st: &ParamStore,
        idx: &[usize],
        ctx: &mut Ctx,
    ) -> Result<(Gradients<f32, Cpu>, f64)> {
        let (k, b) = (self.data.words.len(), idx.len());
        let mut onehot = vec![0f32; b * k];
        for (r, &i) in idx.iter().enumerate() {
            onehot[r * k + self.data.train_y[i]] = 1.0;
        }
        let x = self.batch_input(&self.data.train_x, idx).leaky_traced();
        let logits = m.forward(st, x, b, ctx)?;
        let loss = contiguous_cross_entropy(logits, self.dev.tensor_from_vec(onehot, (b, k)));
        let v = loss.array() as f64;
        Ok((loss.backward(), v))
    }

    fn epoch_metrics(&self, m: &Encoder, st: &ParamStore) -> Result<BTreeMap<String, f64>> {
        let (pred, _) = self.predict(m, st, None)?;
        Ok(bucket_accuracy(
            &pred,
            &self.data.test_y,
            &self.data.buckets,
        ))
    }

    fn finish(
        &self,
        m: &Encoder,
        st: &ParamStore,
        _dir: &Path,
    ) -> Result<(BTreeMap<String, f64>, Vec<Tap>)> {
        let sub = self.cfg.eval_subset.min(self.data.test_y.len());
        let (pred, taps) = self.predict(m, st, Some(sub))?;
        let pops = m.hidden_populations();
        Ok((
            bucket_accuracy(&pred, &self.data.test_y, &self.data.buckets),
            taps.into_iter()
                .filter(|t| pops.contains(&t.population))
                .collect(),
        ))
    }
}

/// Validates the config, loads the corpus and resolves the runs (building a model to learn
/// its layers). Returns the runs, the corpus and the first seed's task.
pub fn plan(cfg: &SpeechConfig, dev: &Cpu) -> Result<(Vec<ConvRunSpec>, Arc<Corpus>, SpeechTask)> {
    cfg.validate()?;
    let corpus = Arc::new(cfg.load_corpus()?);
    let seed = cfg.seeds[0];
    let task = SpeechTask::new(cfg, &corpus, seed, dev)?;
    let runs = convrun::plan_runs(
        &task,
        dev,
        seed,
        &cfg.pruning,
        &cfg.arms,
        &cfg.seeds,
        &cfg.train,
        "samples",
        |m| m.prunable(),
    )?;
    Ok((runs, corpus, task))
}

const METRICS: [(&str, &str, f64); 4] = [
    ("accuracy", "accuracy (%)", 100.0),
    ("acc_head", "head words (%)", 100.0),
    ("acc_mid", "mid words (%)", 100.0),
    ("acc_tail", "tail words (%)", 100.0),
];

/// The report of a finished speech experiment.
pub fn report(cfg: &SpeechConfig, data: &SpeechData, runs: &[ConvRunResult]) -> Result<String> {
    let arms = convrun::summarise(runs);
    let mut w = String::new();
    writeln!(w, "# {}: spoken-command recognition (stand-in)\n", cfg.name)?;
    let src = match cfg.data.source {
        Source::Synth => "words synthesized with espeak-ng and flite",
        Source::Tones => "generated tone sequences (no speech at all)",
    };
    writeln!(
        w,
        "**This is a stand-in.** No speech corpus can be obtained offline, so the paper's \
         speech-recognition experiment (LibriSpeech, word error rate with tail-word buckets) \
         is replaced by classifying {} spoken commands: {src}, with whole voices held out for \
         test. Accuracy replaces WER; the head / mid / tail buckets are the thirds of the \
         words by training frequency. Numbers here say nothing about real speech.\n",
        data.words.len()
    )?;
    if !cfg.description.is_empty() {
        writeln!(w, "{}\n", cfg.description)?;
    }
    let bucket_words = |b: usize| -> String {
        let mut v: Vec<(usize, &str)> = (0..data.words.len())
            .filter(|&i| data.buckets[i] == b)
            .map(|i| (data.train_counts[i], data.words[i].as_str()))
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.0));
        v.iter()
            .map(|(c, s)| format!("{s} ({c})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        w,
        "Data: Zipf exponent {} (training clips per word, before augmentation: head {}; mid {}; \
         tail {}). Voices (training / held out): {}. Speed x{:?}, pitch +-{} semitones; each \
         training clip appears {} times with white noise at {:?} dB SNR and a shift of up to \
         {} ms; {} training samples, {} test clips (balanced, held-out voices, one fixed \
         noisy version each).\n",
        cfg.data.zipf_exponent,
        bucket_words(0),
        bucket_words(1),
        bucket_words(2),
        data.voices
            .iter()
            .map(|(s, t, h)| format!("{s} {t} / {h}"))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.data.speed,
        cfg.data.pitch_semitones,
        cfg.augment.copies,
        cfg.augment.snr_db,
        cfg.augment.shift_ms,
        data.train_y.len(),
        data.test_y.len()
    )?;
    writeln!(
        w,
        "Setup: {} log-mel bands every {} samples, {} frames per token ({} tokens); a pre-norm \
         Transformer encoder (d_model {}, {} heads, FFN {}, {} blocks, mean pooling) trained \
         with cross-entropy ({} epochs, batch {}, lr {}). Seeds: {:?}. Every pruning method \
         prunes both FFN linears of every block to the same density. BB with SP-in selects \
         each row by its unit's activity (on the first projection: the FFN hidden units' \
         fan-in), BB with SP-out each column (on the second projection: the hidden units' \
         fan-out); an arm may set the actuator per layer (the paper's pairing: SP-in on the \
         first projection, SP-out on the second).\n",
        cfg.features.n_mels,
        cfg.features.hop,
        cfg.model.patch,
        data.tokens,
        cfg.model.d_model,
        cfg.model.heads,
        cfg.model.d_ff,
        cfg.model.layers,
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.seeds
    )?;
    writeln!(w, "## Results (mean ± 95 % t-interval over seeds)\n")?;
    convrun::write_common_tables(&mut w, &arms, &METRICS)?;
    convrun::write_paired_section(&mut w, &arms, &METRICS, None)?;
    writeln!(
        w,
        "## Sparsity: target vs achieved density per pruned layer (first seed)\n"
    )?;
    convrun::write_layer_table(&mut w, runs)?;
    convrun::write_time(&mut w, runs)?;
    Ok(w)
}
