//! Log-mel features: 25 ms Hann windows every 10 ms, a 512-point real FFT, 40 triangular
//! mel bands (HTK mel scale) and the natural log of the band energies.

use anyhow::{ensure, Result};
use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

fn d_rate() -> u32 {
    16_000
}
fn d_win() -> usize {
    400
}
fn d_hop() -> usize {
    160
}
fn d_fft() -> usize {
    512
}
fn d_mels() -> usize {
    40
}
fn d_fmin() -> f64 {
    20.0
}
fn d_floor() -> f64 {
    1e-6
}

/// Feature settings (the `[features]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MelConfig {
    /// Sample rate of the audio, Hz.
    #[serde(default = "d_rate")]
    pub sample_rate: u32,
    /// Window length, samples (400 = 25 ms at 16 kHz).
    #[serde(default = "d_win")]
    pub win: usize,
    /// Hop, samples (160 = 10 ms at 16 kHz).
    #[serde(default = "d_hop")]
    pub hop: usize,
    /// FFT length (>= `win`, a power of two is fastest).
    #[serde(default = "d_fft")]
    pub n_fft: usize,
    /// Mel bands.
    #[serde(default = "d_mels")]
    pub n_mels: usize,
    /// Lowest band edge, Hz.
    #[serde(default = "d_fmin")]
    pub fmin: f64,
    /// Highest band edge, Hz (default: half the sample rate).
    #[serde(default)]
    pub fmax: Option<f64>,
    /// Added to the band energies before the log.
    #[serde(default = "d_floor")]
    pub floor: f64,
}

impl Default for MelConfig {
    fn default() -> Self {
        Self {
            sample_rate: d_rate(),
            win: d_win(),
            hop: d_hop(),
            n_fft: d_fft(),
            n_mels: d_mels(),
            fmin: d_fmin(),
            fmax: None,
            floor: d_floor(),
        }
    }
}

impl MelConfig {
    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.sample_rate >= 1000,
            "features.sample_rate must be >= 1000"
        );
        ensure!(self.win >= 2, "features.win must be >= 2");
        ensure!(self.hop >= 1, "features.hop must be >= 1");
        ensure!(
            self.n_fft >= self.win,
            "features.n_fft ({}) must be >= features.win ({})",
            self.n_fft,
            self.win
        );
        ensure!(
            (1..=256).contains(&self.n_mels),
            "features.n_mels must be in 1..=256"
        );
        let nyq = self.sample_rate as f64 / 2.0;
        let fmax = self.fmax.unwrap_or(nyq);
        ensure!(
            self.fmin >= 0.0 && self.fmin < fmax && fmax <= nyq,
            "features.fmin / fmax must satisfy 0 <= fmin < fmax <= {nyq}"
        );
        ensure!(
            self.floor > 0.0 && self.floor.is_finite(),
            "features.floor must be > 0"
        );
        Ok(())
    }

    /// Frames of a clip of `n` samples (whole windows only).
    pub fn frames(&self, n: usize) -> usize {
        if n < self.win {
            0
        } else {
            1 + (n - self.win) / self.hop
        }
    }
}

/// HTK mel scale.
pub fn hz_to_mel(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

/// Inverse of [`hz_to_mel`].
pub fn mel_to_hz(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

/// Triangular filters `[n_mels][n_fft / 2 + 1]` with peaks equally spaced in mel between
/// `fmin` and `fmax`, each peaking at 1; also the centre frequency of each band.
pub fn filterbank(cfg: &MelConfig) -> (Vec<Vec<f64>>, Vec<f64>) {
    let bins = cfg.n_fft / 2 + 1;
    let fmax = cfg.fmax.unwrap_or(cfg.sample_rate as f64 / 2.0);
    let (m0, m1) = (hz_to_mel(cfg.fmin), hz_to_mel(fmax));
    let edges: Vec<f64> = (0..cfg.n_mels + 2)
        .map(|i| mel_to_hz(m0 + (m1 - m0) * i as f64 / (cfg.n_mels + 1) as f64))
        .collect();
    let bin_hz = cfg.sample_rate as f64 / cfg.n_fft as f64;
    let bank = (0..cfg.n_mels)
        .map(|m| {
            let (lo, c, hi) = (edges[m], edges[m + 1], edges[m + 2]);
            (0..bins)
                .map(|k| {
                    let f = k as f64 * bin_hz;
                    if f <= lo || f >= hi {
                        0.0
                    } else if f <= c {
                        (f - lo) / (c - lo)
                    } else {
                        (hi - f) / (hi - c)
                    }
                })
                .collect()
        })
        .collect();
    (bank, edges[1..=cfg.n_mels].to_vec())
}

/// Periodic Hann window.
pub fn hann(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
        .collect()
}

/// A log-mel extractor with its FFT plan and filters (build once, use from any thread).
pub struct LogMel {
    cfg: MelConfig,
    window: Vec<f32>,
    /// Per band: first bin and the non-zero weights from there.
    bands: Vec<(usize, Vec<f32>)>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel").field("cfg", &self.cfg).finish()
    }
}

impl LogMel {
    /// An extractor for `cfg` (validated here).
    pub fn new(cfg: &MelConfig) -> Result<Self> {
        cfg.validate()?;
        let (bank, _) = filterbank(cfg);
        let bands = bank
            .iter()
            .map(|w| {
                let first = w.iter().position(|&v| v > 0.0).unwrap_or(0);
                let last = w.iter().rposition(|&v| v > 0.0).unwrap_or(0);
                let ws = if last >= first {
                    w[first..=last].iter().map(|&v| v as f32).collect()
                } else {
                    Vec::new()
                };
                (first, ws)
            })
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(cfg.n_fft);
        Ok(Self {
            cfg: cfg.clone(),
            window: hann(cfg.win).into_iter().map(|v| v as f32).collect(),
            bands,
            fft,
        })
    }

    /// The settings.
    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// Log-mel features of `x`, `[frames, n_mels]` row-major.
    pub fn compute(&self, x: &[f32]) -> Vec<f32> {
        let c = &self.cfg;
        let frames = c.frames(x.len());
        let mut out = Vec::with_capacity(frames * c.n_mels);
        let mut buf = self.fft.make_input_vec();
        let mut spec = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; spec.len()];
        for f in 0..frames {
            let s = &x[f * c.hop..f * c.hop + c.win];
            buf.fill(0.0);
            for ((b, &v), &w) in buf.iter_mut().zip(s).zip(&self.window) {
                *b = v * w;
            }
            // lengths come from the plan, so this cannot fail
            if self
                .fft
                .process_with_scratch(&mut buf, &mut spec, &mut scratch)
                .is_err()
            {
                out.extend(std::iter::repeat_n(c.floor.ln() as f32, c.n_mels));
                continue;
            }
            for (p, z) in power.iter_mut().zip(&spec) {
                *p = z.re * z.re + z.im * z.im;
            }
            for (first, w) in &self.bands {
                let e: f32 = w.iter().zip(&power[*first..]).map(|(a, b)| a * b).sum();
                out.push((e as f64 + c.floor).ln() as f32);
            }
        }
        out
    }
}

/// The reference computation in f64 with a naive DFT (for tests): `[frames, n_mels]`.
pub fn log_mel_naive(cfg: &MelConfig, x: &[f32]) -> Vec<f64> {
    let (bank, _) = filterbank(cfg);
    let win = hann(cfg.win);
    let bins = cfg.n_fft / 2 + 1;
    let mut out = Vec::new();
    for f in 0..cfg.frames(x.len()) {
        let s: Vec<f64> = (0..cfg.win)
            .map(|i| x[f * cfg.hop + i] as f64 * win[i])
            .collect();
        let power: Vec<f64> = (0..bins)
            .map(|k| {
                let (mut re, mut im) = (0.0, 0.0);
                for (i, &v) in s.iter().enumerate() {
                    let a = -2.0 * std::f64::consts::PI * (k * i) as f64 / cfg.n_fft as f64;
                    re += v * a.cos();
                    im += v * a.sin();
                }
                re * re + im * im
            })
            .collect();
        for w in &bank {
            let e: f64 = w.iter().zip(&power).map(|(a, b)| a * b).sum();
            out.push((e + cfg.floor).ln());
        }
    }
    out
}
