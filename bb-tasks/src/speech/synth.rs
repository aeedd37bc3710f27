//! The spoken-command corpus: which clips exist (words with Zipf-distributed training counts,
//! voices of two synthesizers with whole voices held out for test, speed and pitch per clip),
//! their synthesis with Debian's `espeak-ng` and `flite`, and the cache on disk.
//!
//! **Plan.** Everything about the corpus follows from the `[data]` table ([`CorpusSpec`]) and
//! its `split_seed`: the words' frequency ranks (a seeded shuffle of the word list), the
//! training count of the word at rank `r` (`max(min_per_word, round(max_per_word / r^s))`),
//! the held-out voices, and each clip's voice, speed and pitch. The training split draws
//! voices only from the training voices, the test split only from the held-out ones; both
//! mix the synthesizers (`flite_share` of the clips use flite).
//!
//! **Cache.** [`build`] writes one 16 kHz mono WAV per clip under
//! `<data dir>/speech/<fingerprint>/clips/` (each written to a temporary name and renamed, so
//! an interrupted build resumes where it stopped) and, once every clip exists,
//! `manifest.json` with the spec and the clip list. The fingerprint is a hash of the spec, so
//! different corpora live side by side. Each clip is trimmed of leading and trailing silence,
//! centred in `clip_ms` and peak-normalized.
//!
//! **Tones.** The `tones` source replaces speech with generated tone sequences ("words" of
//! three notes, "voices" that scale pitch and timbre) built in memory: it needs no
//! synthesizer and serves tests and CI.

use anyhow::{anyhow, bail, ensure, Context, Result};
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The command words (the vocabulary of Speech Commands v2, which is not available offline).
pub const WORDS: [&str; 35] = [
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one", "two",
    "three", "four", "five", "six", "seven", "eight", "nine", "bed", "bird", "cat", "dog", "happy",
    "house", "marvin", "sheila", "tree", "wow", "backward", "forward", "follow", "learn", "visual",
];

/// Sample rate of every stored clip.
pub const RATE: u32 = 16_000;

const INSTALL: &str = "install them with `apt-get install -y espeak-ng flite` (Debian/Ubuntu)";

/// Where the audio comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `espeak-ng` and `flite` (built once with `bb speech build`).
    Synth,
    /// Generated tone sequences in memory (tests and CI; no tools needed).
    Tones,
}

fn d_words() -> usize {
    35
}
fn d_zipf() -> f64 {
    1.0
}
fn d_max() -> usize {
    300
}
fn d_min() -> usize {
    8
}
fn d_test() -> usize {
    30
}
fn d_accents() -> Vec<String> {
    // `en` is British English (gmw/en); `en-gb` resolves to an mbrola voice that is not
    // installed and falls back to one voice whatever the variant
    [
        "en-us",
        "en",
        "en-gb-scotland",
        "en-gb-x-rp",
        "en-gb-x-gbclan",
        "en-gb-x-gbcwmd",
        "en-029",
    ]
    .map(String::from)
    .to_vec()
}
fn d_variants() -> Vec<String> {
    [
        "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
        "klatt3", "Alex", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mike", "Storm",
        "anika", "belinda", "edward", "john", "linda", "max", "paul", "robert", "steph",
    ]
    .map(String::from)
    .to_vec()
}
fn d_flite() -> Vec<String> {
    ["kal", "kal16", "awb", "rms", "slt"]
        .map(String::from)
        .to_vec()
}
fn d_heldout_flite() -> Vec<String> {
    vec!["rms".to_string()]
}
fn d_heldout_fraction() -> f64 {
    0.2
}
fn d_flite_share() -> f64 {
    0.35
}
fn d_speed() -> [f64; 2] {
    [0.8, 1.25]
}
fn d_pitch() -> f64 {
    3.0
}
fn d_clip_ms() -> usize {
    1000
}
fn d_split_seed() -> u64 {
    7
}
fn d_tone_voices() -> usize {
    10
}

/// What the corpus holds: the synthesis half of the `[data]` table (every field enters the
/// fingerprint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    /// Audio source.
    pub source: Source,
    /// Words used (the first ones of [`WORDS`]; tones: any number >= 3).
    #[serde(default = "d_words")]
    pub words: usize,
    /// Zipf exponent of the training counts.
    #[serde(default = "d_zipf")]
    pub zipf_exponent: f64,
    /// Training clips of the most frequent word.
    #[serde(default = "d_max")]
    pub max_per_word: usize,
    /// Floor of the training clips per word.
    #[serde(default = "d_min")]
    pub min_per_word: usize,
    /// Test clips per word (balanced), all from held-out voices.
    #[serde(default = "d_test")]
    pub test_per_word: usize,
    /// espeak-ng accents (`-v ACCENT+VARIANT`).
    #[serde(default = "d_accents")]
    pub espeak_accents: Vec<String>,
    /// espeak-ng voice variants; every accent x variant pair is one voice.
    #[serde(default = "d_variants")]
    pub espeak_variants: Vec<String>,
    /// flite voices.
    #[serde(default = "d_flite")]
    pub flite_voices: Vec<String>,
    /// flite voices held out for test.
    #[serde(default = "d_heldout_flite")]
    pub heldout_flite: Vec<String>,
    /// Fraction of the espeak-ng voices (and of the tone voices) held out for test.
    #[serde(default = "d_heldout_fraction")]
    pub heldout_fraction: f64,
    /// Fraction of the clips spoken by flite.
    #[serde(default = "d_flite_share")]
    pub flite_share: f64,
    /// Speaking-rate factor range `[lo, hi]` (1 = the voice's default).
    #[serde(default = "d_speed")]
    pub speed: [f64; 2],
    /// Pitch shift range, +- semitones.
    #[serde(default = "d_pitch")]
    pub pitch_semitones: f64,
    /// Clip length, ms.
    #[serde(default = "d_clip_ms")]
    pub clip_ms: usize,
    /// Seed of the plan (ranks, held-out voices, per-clip draws).
    #[serde(default = "d_split_seed")]
    pub split_seed: u64,
    /// Tones: number of voices.
    #[serde(default = "d_tone_voices")]
    pub tone_voices: usize,
}

impl CorpusSpec {
    /// Checks the fields; errors name them (`data.<field>`).
    pub fn validate(&self) -> Result<()> {
        match self.source {
            Source::Synth => ensure!(
                (3..=WORDS.len()).contains(&self.words),
                "data.words must be in 3..={} for the synth source",
                WORDS.len()
            ),
            Source::Tones => ensure!(
                (3..=200).contains(&self.words),
                "data.words must be in 3..=200"
            ),
        }
        ensure!(
            self.zipf_exponent.is_finite() && self.zipf_exponent >= 0.0,
            "data.zipf_exponent must be >= 0"
        );
        ensure!(self.min_per_word >= 1, "data.min_per_word must be >= 1");
        ensure!(
            self.max_per_word >= self.min_per_word,
            "data.max_per_word must be >= data.min_per_word"
        );
        ensure!(self.test_per_word >= 1, "data.test_per_word must be >= 1");
        ensure!(
            self.heldout_fraction > 0.0 && self.heldout_fraction < 1.0,
            "data.heldout_fraction must be in (0, 1)"
        );
        ensure!(
            (0.0..=1.0).contains(&self.flite_share),
            "data.flite_share must be in [0, 1]"
        );
        ensure!(
            self.speed[0] > 0.2 && self.speed[0] <= self.speed[1] && self.speed[1] < 5.0,
            "data.speed must be [lo, hi] with 0.2 < lo <= hi < 5"
        );
        ensure!(
            (0.0..=12.0).contains(&self.pitch_semitones),
            "data.pitch_semitones must be in [0, 12]"
        );
        ensure!(
            (200..=5000).contains(&self.clip_ms),
            "data.clip_ms must be in 200..=5000"
        );
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        for (field, v) in [
            ("espeak_accents", &self.espeak_accents),
            ("espeak_variants", &self.espeak_variants),
            ("flite_voices", &self.flite_voices),
        ] {
            for (i, s) in v.iter().enumerate() {
                ensure!(
                    name_ok(s),
                    "data.{field}[{i}] = {s:?} is not a voice name (letters, digits, '-', '_')"
                );
                ensure!(!v[..i].contains(s), "data.{field}: {s:?} appears twice");
            }
        }
        for h in &self.heldout_flite {
            ensure!(
                self.flite_voices.contains(h),
                "data.heldout_flite: {h:?} is not in data.flite_voices"
            );
        }
        match self.source {
            Source::Synth => {
                let n_es = self.espeak_accents.len() * self.espeak_variants.len();
                ensure!(
                    n_es >= 2,
                    "data.espeak_accents x data.espeak_variants must give two voices at least \
                     (one to train on, one to hold out)"
                );
                if self.flite_share > 0.0 {
                    ensure!(
                        !self.heldout_flite.is_empty()
                            && self.heldout_flite.len() < self.flite_voices.len(),
                        "data.heldout_flite must hold out some but not all of data.flite_voices \
                         when data.flite_share > 0"
                    );
                }
            }
            Source::Tones => ensure!(self.tone_voices >= 2, "data.tone_voices must be >= 2"),
        }
        Ok(())
    }

    /// Samples per clip.
    pub fn clip_samples(&self) -> usize {
        RATE as usize * self.clip_ms / 1000
    }

    /// A stable hash of the spec (names the cache folder).
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The cache folder of this corpus under the data folder.
    pub fn cache_dir(&self, data_dir: &Path) -> PathBuf {
        data_dir.join("speech").join(self.fingerprint())
    }
}

/// A synthesizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synth {
    /// `espeak-ng`.
    Espeak,
    /// `flite`.
    Flite,
    /// Generated tones.
    Tones,
}

/// One voice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voice {
    /// Synthesizer.
    pub synth: Synth,
    /// `accent+variant` (espeak-ng), voice name (flite) or `tone<i>`.
    pub name: String,
    /// Held out of training (test voices).
    pub heldout: bool,
}

/// Train or test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training clip.
    Train,
    /// Test clip (held-out voice).
    Test,
}

/// One planned clip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clip {
    /// File stem.
    pub id: String,
    /// Word index (into [`Plan::words`]).
    pub word: usize,
    /// Voice index (into [`Plan::voices`]).
    pub voice: usize,
    /// Speaking-rate factor.
    pub speed: f64,
    /// Pitch shift, semitones.
    pub pitch: f64,
    /// Split.
    pub split: Split,
}

/// The whole corpus plan (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Words.
    pub words: Vec<String>,
    /// Training clips per word.
    pub train_counts: Vec<usize>,
    /// Frequency rank of each word (0 = most frequent).
    pub rank: Vec<usize>,
    /// Voices.
    pub voices: Vec<Voice>,
    /// Clips, training first.
    pub clips: Vec<Clip>,
}

impl Plan {
    /// Bucket of each word by training frequency: 0 head (the most frequent third of the
    /// words), 1 mid, 2 tail (the least frequent third).
    pub fn buckets(&self) -> Vec<usize> {
        let k = self.words.len();
        self.rank.iter().map(|&r| (r * 3) / k).collect()
    }
}

/// Training count of the word at frequency rank `r` (0-based).
pub fn zipf_count(spec: &CorpusSpec, r: usize) -> usize {
    let v = spec.max_per_word as f64 / ((r + 1) as f64).powf(spec.zipf_exponent);
    (v.round() as usize).max(spec.min_per_word)
}

/// The corpus plan of a (validated) spec.
pub fn plan(spec: &CorpusSpec) -> Result<Plan> {
    spec.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.split_seed ^ 0x5350_4545_4348);
    let words: Vec<String> = match spec.source {
        Source::Synth => WORDS[..spec.words].iter().map(|s| s.to_string()).collect(),
        Source::Tones => (0..spec.words).map(|i| format!("tone{i:03}")).collect(),
    };
    let k = words.len();
    let mut order: Vec<usize> = (0..k).collect();
    order.shuffle(&mut rng);
    let mut rank = vec![0; k];
    for (r, &w) in order.iter().enumerate() {
        rank[w] = r;
    }
    let train_counts: Vec<usize> = rank.iter().map(|&r| zipf_count(spec, r)).collect();
    let mut voices = Vec::new();
    let mut hold = |mut v: Vec<Voice>, n_hold: usize, rng: &mut ChaCha8Rng| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.shuffle(rng);
        for &i in &idx[..n_hold] {
            v[i].heldout = true;
        }
        voices.extend(v);
    };
    match spec.source {
        Source::Synth => {
            let es: Vec<Voice> = spec
                .espeak_accents
                .iter()
                .flat_map(|a| {
                    spec.espeak_variants.iter().map(move |v| Voice {
                        synth: Synth::Espeak,
                        name: format!("{a}+{v}"),
                        heldout: false,
                    })
                })
                .collect();
            let n = es.len();
            let h = ((n as f64 * spec.heldout_fraction).round() as usize).clamp(1, n - 1);
            hold(es, h, &mut rng);
            if spec.flite_share > 0.0 {
                voices.extend(spec.flite_voices.iter().map(|v| Voice {
                    synth: Synth::Flite,
                    name: v.clone(),
                    heldout: spec.heldout_flite.contains(v),
                }));
            }
        }
        Source::Tones => {
            let n = spec.tone_voices;
            let tv = (0..n)
                .map(|i| Voice {
                    synth: Synth::Tones,
                    name: format!("tone{i}"),
                    heldout: false,
                })
                .collect();
            let h = ((n as f64 * spec.heldout_fraction).round() as usize).clamp(1, n - 1);
            hold(tv, h, &mut rng);
        }
    }
    let pick = |rng: &mut ChaCha8Rng, heldout: bool| -> usize {
        let pool = |s: Synth| -> Vec<usize> {
            (0..voices.len())
                .filter(|&i| voices[i].synth == s && voices[i].heldout == heldout)
                .collect()
        };
        let (main, other) = match spec.source {
            Source::Synth => (pool(Synth::Espeak), pool(Synth::Flite)),
            Source::Tones => (pool(Synth::Tones), Vec::new()),
        };
        let use_other = !other.is_empty() && rng.gen_bool(spec.flite_share);
        let p = if use_other { &other } else { &main };
        p[rng.gen_range(0..p.len())]
    };
    let mut clips = Vec::new();
    for (split, tag) in [(Split::Train, "tr"), (Split::Test, "te")] {
        for (w, word) in words.iter().enumerate() {
            let n = match split {
                Split::Train => train_counts[w],
                Split::Test => spec.test_per_word,
            };
            for i in 0..n {
                let voice = pick(&mut rng, split == Split::Test);
                let speed = rng.gen_range(spec.speed[0]..=spec.speed[1]);
                let pitch = if spec.pitch_semitones > 0.0 {
                    rng.gen_range(-spec.pitch_semitones..=spec.pitch_semitones)
                } else {
                    0.0
                };
                clips.push(Clip {
                    id: format!("{tag}-{word}-{i:04}"),
                    word: w,
                    voice,
                    speed,
                    pitch,
                    split,
                });
            }
        }
    }
    Ok(Plan {
        words,
        train_counts,
        rank,
        voices,
        clips,
    })
}

/// Whether `espeak-ng` and `flite` run; an error saying how to install them otherwise.
pub fn check_tools() -> Result<()> {
    // flite exits with 1 after printing its version, so success is not asked of it
    for (tool, arg, need_success) in [("espeak-ng", "--version", true), ("flite", "-lv", false)] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success() || !need_success);
        ensure!(
            ok,
            "the speech corpus needs `{tool}`, which is not installed or does not run; {INSTALL}"
        );
    }
    Ok(())
}

/// Whether both synthesizers are available.
pub fn tools_available() -> bool {
    check_tools().is_ok()
}

/// Windowed-sinc resampling (16 zero crossings each side, Hann-windowed, cutoff at 95 % of
/// the lower Nyquist frequency).
pub fn resample(x: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || x.is_empty() {
        return x.to_vec();
    }
    const W: f64 = 16.0;
    let ratio = to as f64 / from as f64;
    let cut = 0.95 * ratio.min(1.0);
    let n_out = ((x.len() as f64) * ratio).floor() as usize;
    let half = (W / cut).ceil() as i64;
    (0..n_out)
        .map(|n| {
            let t = n as f64 / ratio;
            let c = t.floor() as i64;
            let mut acc = 0.0;
            for k in (c - half + 1)..=(c + half) {
                if k < 0 || k as usize >= x.len() {
                    continue;
                }
                let d = t - k as f64;
                let u = d * cut;
                let sinc = if u.abs() < 1e-12 {
                    1.0
                } else {
                    (std::f64::consts::PI * u).sin() / (std::f64::consts::PI * u)
                };
                let wpos = d / (half as f64);
                if wpos.abs() >= 1.0 {
                    continue;
                }
                let win = 0.5 + 0.5 * (std::f64::consts::PI * wpos).cos();
                acc += x[k as usize] as f64 * cut * sinc * win;
            }
            acc as f32
        })
        .collect()
}

/// Trims leading and trailing silence (below 2 % of the peak), centres the rest in `len`
/// samples (cropping the middle if longer) and scales the peak to 0.5. Errors on silence.
pub fn fit_clip(x: &[f32], len: usize) -> Result<Vec<f32>> {
    let peak = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    ensure!(peak > 1e-4, "the synthesizer produced silence");
    let thr = 0.02 * peak;
    let first = x.iter().position(|v| v.abs() > thr).unwrap_or(0);
    let last = x.iter().rposition(|v| v.abs() > thr).unwrap_or(x.len() - 1);
    let s = &x[first..=last];
    let mut out = vec![0f32; len];
    if s.len() >= len {
        let off = (s.len() - len) / 2;
        out.copy_from_slice(&s[off..off + len]);
    } else {
        let off = (len - s.len()) / 2;
        out[off..off + s.len()].copy_from_slice(s);
    }
    let g = 0.5 / peak;
    out.iter_mut().for_each(|v| *v *= g);
    Ok(out)
}

/// Reads a WAV file as mono f32 in [-1, 1] with its sample rate.
pub fn read_wav(path: &Path) -> Result<(Vec<f32>, u32)> {
    let mut r =
        hound::WavReader::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec = r.spec();
    ensure!(
        spec.channels >= 1,
        "{}: a WAV file without channels",
        path.display()
    );
    let ch = spec.channels as usize;
    let raw: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: bad samples", path.display()))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            r.samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: bad samples", path.display()))?
        }
    };
    let mono = raw
        .chunks(ch)
        .map(|c| c.iter().sum::<f32>() / ch as f32)
        .collect();
    Ok((mono, spec.sample_rate))
}

/// Writes 16 kHz mono 16-bit PCM to `path` through a temporary file (atomic).
pub fn write_wav(path: &Path, x: &[f32]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    {
        let mut w = hound::WavWriter::create(&tmp, spec)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        for &v in x {
            w.write_sample((v.clamp(-1.0, 1.0) * 32767.0).round() as i16)?;
        }
        w.finalize()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot move {}", tmp.display()))
}

/// Base pitch of the flite voices (Hz), for the pitch shift.
fn flite_f0(voice: &str) -> f64 {
    match voice {
        "slt" => 170.0,
        "awb" => 115.0,
        "rms" => 100.0,
        _ => 105.0,
    }
}

/// Synthesizes one clip with its synthesizer; returns the fitted 16 kHz audio.
pub fn synthesize(spec: &CorpusSpec, plan: &Plan, clip: &Clip, tmp_dir: &Path) -> Result<Vec<f32>> {
    let voice = &plan.voices[clip.voice];
    let word = &plan.words[clip.word];
    let raw = match voice.synth {
        Synth::Tones => tone_audio(clip.word, clip.voice, clip.speed, clip.pitch),
        Synth::Espeak | Synth::Flite => {
            let tmp = tmp_dir.join(format!("{}.wav", clip.id));
            let out = if voice.synth == Synth::Espeak {
                let wpm = (175.0 * clip.speed).round() as i64;
                let pitch = (50.0 + 8.0 * clip.pitch).round().clamp(0.0, 99.0) as i64;
                Command::new("espeak-ng")
                    .args(["-v", &voice.name, "-s", &wpm.to_string()])
                    .args(["-p", &pitch.to_string(), "-w"])
                    .arg(&tmp)
                    .arg(word)
                    .output()
            } else {
                let f0 = flite_f0(&voice.name) * 2f64.powf(clip.pitch / 12.0);
                Command::new("flite")
                    .args(["-voice", &voice.name, "--setf"])
                    .arg(format!("duration_stretch={:.4}", 1.0 / clip.speed))
                    .arg("--setf")
                    .arg(format!("int_f0_target_mean={f0:.1}"))
                    .args(["-t", word, "-o"])
                    .arg(&tmp)
                    .output()
            };
            let tool = if voice.synth == Synth::Espeak {
                "espeak-ng"
            } else {
                "flite"
            };
            let out = out.map_err(|e| anyhow!("cannot run {tool}: {e}; {INSTALL}"))?;
            ensure!(
                out.status.success(),
                "{tool} failed on clip {} (voice {}): {}",
                clip.id,
                voice.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let (x, rate) = read_wav(&tmp)?;
            let _ = fs::remove_file(&tmp);
            resample(&x, rate, RATE)
        }
    };
    fit_clip(&raw, spec.clip_samples())
        .with_context(|| format!("clip {} ({word}, voice {})", clip.id, voice.name))
}

/// A generated "word": three notes (from a fixed table per word) with voice-specific pitch
/// and timbre, at 16 kHz.
pub fn tone_audio(word: usize, voice: usize, speed: f64, pitch: f64) -> Vec<f32> {
    let mut wr = ChaCha8Rng::seed_from_u64(0x544f_4e45 ^ (word as u64).wrapping_mul(0x9e37));
    let notes: Vec<f64> = (0..3)
        .map(|_| 300.0 * 2f64.powf(wr.gen_range(0..24) as f64 / 8.0))
        .collect();
    let mut vr = ChaCha8Rng::seed_from_u64(0x564f_4943 ^ (voice as u64).wrapping_mul(0x7f4a));
    let vscale = 2f64.powf(vr.gen_range(-4.0..4.0) / 12.0);
    let (h2, h3) = (vr.gen_range(0.0..0.6), vr.gen_range(0.0..0.4));
    let scale = vscale * 2f64.powf(pitch / 12.0);
    let note_len = (0.12 / speed * RATE as f64) as usize;
    let gap = (0.02 / speed * RATE as f64) as usize;
    let mut out = Vec::new();
    for f in notes {
        let f = f * scale;
        for i in 0..note_len {
            let t = i as f64 / RATE as f64;
            let env = (std::f64::consts::PI * i as f64 / note_len as f64).sin();
            let w = 2.0 * std::f64::consts::PI * f * t;
            out.push((env * (w.sin() + h2 * (2.0 * w).sin() + h3 * (3.0 * w).sin())) as f32);
        }
        out.extend(std::iter::repeat_n(0.0, gap));
    }
    out
}

/// The `manifest.json` of a finished corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Fingerprint of the spec.
    pub fingerprint: String,
    /// The spec.
    pub spec: CorpusSpec,
    /// The plan (words, counts, voices, clips).
    pub plan: Plan,
    /// Seconds the last build invocation took (not reproducible).
    pub build_s: f64,
}

/// What a build did.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildReport {
    /// The corpus folder.
    pub dir: PathBuf,
    /// Clips in the plan.
    pub clips: usize,
    /// Clips synthesized by this invocation (the rest existed).
    pub made: usize,
    /// Seconds.
    pub secs: f64,
}

/// Synthesizes every missing clip of `spec` into `dir` with `jobs` parallel synthesizer
/// processes, then writes the manifest (see the module docs). Resumes an interrupted build.
pub fn build(
    spec: &CorpusSpec,
    dir: &Path,
    jobs: usize,
    progress: Option<&ProgressBar>,
) -> Result<BuildReport> {
    let t0 = std::time::Instant::now();
    let plan = plan(spec)?;
    if spec.source == Source::Synth {
        check_tools()?;
    }
    let clips_dir = dir.join("clips");
    let tmp_dir = dir.join("tmp");
    for d in [&clips_dir, &tmp_dir] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let todo: Vec<&Clip> = plan
        .clips
        .iter()
        .filter(|c| !clips_dir.join(format!("{}.wav", c.id)).is_file())
        .collect();
    if let Some(pb) = progress {
        pb.set_length(todo.len() as u64);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()
        .map_err(|e| anyhow!("cannot start {jobs} build threads: {e}"))?;
    pool.install(|| {
        todo.par_iter().try_for_each(|c| -> Result<()> {
            let audio = synthesize(spec, &plan, c, &tmp_dir)?;
            write_wav(&clips_dir.join(format!("{}.wav", c.id)), &audio)?;
            if let Some(pb) = progress {
                pb.inc(1);
            }
            Ok(())
        })
    })?;
    let _ = fs::remove_dir_all(&tmp_dir);
    let secs = t0.elapsed().as_secs_f64();
    let m = Manifest {
        fingerprint: spec.fingerprint(),
        spec: spec.clone(),
        plan: plan.clone(),
        build_s: secs,
    };
    crate::io::write_atomic(
        &dir.join("manifest.json"),
        serde_json::to_string_pretty(&m)?.as_bytes(),
    )?;
    Ok(BuildReport {
        dir: dir.to_path_buf(),
        clips: plan.clips.len(),
        made: todo.len(),
        secs,
    })
}

/// The corpus in memory: its plan and every clip's audio (16 kHz, `clip_ms` long).
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The plan.
    pub plan: Plan,
    /// Audio per clip, in the order of `plan.clips`.
    pub audio: Vec<Vec<f32>>,
}

/// Loads a built corpus from `dir` (the `synth` source), or generates the `tones` corpus.
pub fn load(spec: &CorpusSpec, dir: &Path) -> Result<Corpus> {
    if spec.source == Source::Tones {
        let plan = plan(spec)?;
        let audio = plan
            .clips
            .par_iter()
            .map(|c| {
                fit_clip(
                    &tone_audio(c.word, c.voice, c.speed, c.pitch),
                    spec.clip_samples(),
                )
            })
            .collect::<Result<_>>()?;
        return Ok(Corpus { plan, audio });
    }
    let mp = dir.join("manifest.json");
    let hint = "build it with `bb speech build speech` (or `bb speech build CONFIG.toml` for \
                another [data] table; it needs espeak-ng and flite: `apt-get install -y \
                espeak-ng flite`)";
    let text = fs::read_to_string(&mp).map_err(|_| {
        anyhow!(
            "the speech corpus is not built: {} is missing; {hint}",
            mp.display()
        )
    })?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("in {}", mp.display()))?;
    if m.fingerprint != spec.fingerprint() || &m.spec != spec {
        bail!(
            "{} was built from another [data] table; {hint}",
            mp.display()
        );
    }
    let want = plan(spec)?;
    ensure!(
        m.plan == want,
        "{}: the clip plan differs from the one this version computes; rebuild it ({hint})",
        mp.display()
    );
    let n = spec.clip_samples();
    let audio = want
        .clips
        .par_iter()
        .map(|c| {
            let p = dir.join("clips").join(format!("{}.wav", c.id));
            let (x, rate) = read_wav(&p)?;
            ensure!(
                rate == RATE && x.len() == n,
                "{}: expected {n} samples at {RATE} Hz, found {} at {rate} Hz; rebuild the corpus",
                p.display(),
                x.len()
            );
            Ok(x)
        })
        .collect::<Result<_>>()?;
    Ok(Corpus { plan: want, audio })
}
