//! The speech stand-in: log-mel features against a naive DFT, the corpus plan (Zipf counts,
//! held-out voices) for a fixed seed, resampling, attention against a naive loop, the
//! encoder's gradients against finite differences, and the experiment end to end on generated
//! tones (and on a tiny synthesized corpus where espeak-ng and flite are installed).

mod common;

use bb_tasks::cli_conv::{run_in, CONV_PRESETS};
use bb_tasks::convkit::{Ctx, ParamStore};
use bb_tasks::convrun::read_result;
use bb_tasks::speech::mel::{filterbank, log_mel_naive, LogMel, MelConfig};
use bb_tasks::speech::net::{attention, Encoder, EncoderConfig};
use bb_tasks::speech::synth::{self, CorpusSpec, Source, Split};
use bb_tasks::speech::{bucket_accuracy, SpeechConfig};
use common::TempDir;
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

fn preset() -> toml::Table {
    let p = CONV_PRESETS.iter().find(|p| p.name == "speech").unwrap();
    toml::from_str(p.toml).unwrap()
}

#[test]
fn log_mel_matches_a_naive_dft_and_a_tone_lands_in_its_band() {
    let cfg = MelConfig::default();
    let mel = LogMel::new(&cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..1600).map(|_| rng.gen_range(-0.5..0.5)).collect();
    let fast = mel.compute(&x);
    let slow = log_mel_naive(&cfg, &x);
    assert_eq!(fast.len(), cfg.frames(1600) * cfg.n_mels);
    assert_eq!(fast.len(), slow.len());
    let worst = fast
        .iter()
        .zip(&slow)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-3,
        "log-mel differs from the naive DFT by {worst}"
    );

    let (_, centres) = filterbank(&cfg);
    for f0 in [300.0, 1000.0, 3100.0] {
        let tone: Vec<f32> = (0..4000)
            .map(|i| (2.0 * std::f64::consts::PI * f0 * i as f64 / 16000.0).sin() as f32)
            .collect();
        let want = (0..cfg.n_mels)
            .min_by(|&a, &b| (centres[a] - f0).abs().total_cmp(&(centres[b] - f0).abs()))
            .unwrap();
        for frame in mel.compute(&tone).chunks_exact(cfg.n_mels) {
            let got = (0..cfg.n_mels)
                .max_by(|&a, &b| frame[a].total_cmp(&frame[b]))
                .unwrap();
            assert_eq!(
                got, want,
                "a {f0} Hz tone peaks in band {got}, expected {want}"
            );
        }
    }
    assert!(LogMel::new(&MelConfig {
        n_fft: 256,
        ..MelConfig::default()
    })
    .unwrap_err()
    .to_string()
    .contains("features.n_fft"));
}

#[test]
fn resampling_keeps_a_tone() {
    let f0 = 1000.0;
    let x: Vec<f32> = (0..22050)
        .map(|i| (2.0 * std::f64::consts::PI * f0 * i as f64 / 22050.0).sin() as f32)
        .collect();
    let y = synth::resample(&x, 22050, 16000);
    assert_eq!(y.len(), 16000);
    let worst = (200..15800)
        .map(|i| {
            let want = (2.0 * std::f64::consts::PI * f0 * i as f64 / 16000.0).sin();
            (y[i] as f64 - want).abs()
        })
        .fold(0.0, f64::max);
    assert!(worst < 0.01, "resampled tone off by {worst}");
}

/// The preset's corpus plan: Zipf counts by rank, the held-out voices and the split are
/// exact for its seed.
#[test]
fn corpus_plan_has_zipf_counts_and_held_out_voices() {
    let spec: CorpusSpec = preset()["data"].clone().try_into().unwrap();
    let plan = synth::plan(&spec).unwrap();
    assert_eq!(
        plan,
        synth::plan(&spec).unwrap(),
        "the plan is deterministic"
    );
    assert_eq!(plan.words.len(), 35);
    let mut by_rank = vec![0; 35];
    for (w, &r) in plan.rank.iter().enumerate() {
        by_rank[r] = plan.train_counts[w];
    }
    let want: Vec<usize> = (1..=35)
        .map(|r| ((300.0 / r as f64).round() as usize).max(8))
        .collect();
    assert_eq!(by_rank, want);
    assert_eq!(plan.train_counts.iter().sum::<usize>(), 1246);
    let buckets = plan.buckets();
    for b in 0..3 {
        let n = buckets.iter().filter(|&&x| x == b).count();
        assert!((11..=12).contains(&n), "bucket {b} has {n} words");
    }
    // 7 accents x 33 variants, 20 % held out; flite's rms held out
    let es: Vec<_> = plan
        .voices
        .iter()
        .filter(|v| v.synth == synth::Synth::Espeak)
        .collect();
    assert_eq!(es.len(), 231);
    assert_eq!(es.iter().filter(|v| v.heldout).count(), 46);
    let held_flite: Vec<&str> = plan
        .voices
        .iter()
        .filter(|v| v.synth == synth::Synth::Flite && v.heldout)
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(held_flite, ["rms"]);
    for c in &plan.clips {
        assert_eq!(
            plan.voices[c.voice].heldout,
            c.split == Split::Test,
            "clip {} uses a voice of the wrong split",
            c.id
        );
    }
    let test = plan.clips.iter().filter(|c| c.split == Split::Test).count();
    assert_eq!(test, 35 * 30);
    let flite_test = plan
        .clips
        .iter()
        .filter(|c| c.split == Split::Test && plan.voices[c.voice].synth == synth::Synth::Flite)
        .count();
    assert!(
        (250..=480).contains(&flite_test),
        "{flite_test} flite test clips"
    );
    // the exact held-out voices of this seed
    let first: Vec<&str> = es
        .iter()
        .filter(|v| v.heldout)
        .take(3)
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(first, HELD_OUT_FIRST);
    let other = synth::plan(&CorpusSpec {
        split_seed: 8,
        ..spec.clone()
    })
    .unwrap();
    assert_ne!(other.voices, plan.voices);
    // bad specs name the field
    let bad = CorpusSpec {
        heldout_flite: vec!["nobody".into()],
        ..spec
    };
    assert!(synth::plan(&bad)
        .unwrap_err()
        .to_string()
        .contains("data.heldout_flite"));
}

const HELD_OUT_FIRST: [&str; 3] = ["en-us+klatt2", "en-us+belinda", "en-us+paul"];

#[test]
fn bucket_accuracy_counts_each_bucket() {
    let m = bucket_accuracy(&[0, 1, 2, 2, 0], &[0, 1, 2, 1, 1], &[0, 1, 2]);
    assert_eq!(m["accuracy"], 3.0 / 5.0);
    assert_eq!(m["acc_head"], 1.0);
    assert_eq!(m["acc_mid"], 1.0 / 3.0);
    assert_eq!(m["acc_tail"], 1.0);
}

#[test]
fn attention_matches_a_naive_loop() {
    let dev = Cpu::default();
    let (b, t, h, dh) = (2, 3, 2, 3);
    let d = h * dh;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let (q, k, v) = (r(b * t * d), r(b * t * d), r(b * t * d));
    let y = attention(
        dev.tensor_from_vec(q.clone(), (b * t, d)),
        dev.tensor_from_vec(k.clone(), (b * t, d)),
        dev.tensor_from_vec(v.clone(), (b * t, d)),
        b,
        h,
    )
    .unwrap()
    .as_vec();
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..t {
                let at =
                    |x: &[f32], tok: usize, j: usize| x[(bi * t + tok) * d + hi * dh + j] as f64;
                let s: Vec<f64> = (0..t)
                    .map(|jt| {
                        (0..dh).map(|c| at(&q, i, c) * at(&k, jt, c)).sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for c in 0..dh {
                    let want: f64 = (0..t)
                        .map(|jt| (s[jt] - mx).exp() / z * at(&v, jt, c))
                        .sum();
                    let got = y[(bi * t + i) * d + hi * dh + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "attention ({bi},{hi},{i},{c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Every parameter's gradient of `sum(R * logits)` (with an SP-in factor on the first FFN
/// projection) against central differences of the loss summed in f64.
#[test]
fn encoder_gradients_match_finite_differences() {
    let dev = Cpu::default();
    let cfg = EncoderConfig {
        d_model: 4,
        heads: 2,
        d_ff: 6,
        layers: 1,
        patch: 1,
    };
    let (tokens, dim, classes, batch) = (3, 5, 3, 2);
    let mut st = ParamStore::new(&dev);
    let enc = Encoder::new(&cfg, &mut st, tokens, dim, classes, 11).unwrap();
    let ff1 = enc.blocks[0].ff1.w;
    st.set_scale(ff1, Some(&[1.0, 1.3, 0.7, 1.1, 0.9, 1.2]))
        .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x: Vec<f32> = (0..batch * tokens * dim)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let rw: Vec<f32> = (0..batch * classes)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let loss64 = |st: &ParamStore| -> f64 {
        let z = enc
            .forward(
                st,
                dev.tensor_from_vec(x.clone(), (batch * tokens, dim)),
                batch,
                &mut Ctx::eval(),
            )
            .unwrap()
            .as_vec();
        z.iter().zip(&rw).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let xt = dev
        .tensor_from_vec(x.clone(), (batch * tokens, dim))
        .leaky_traced();
    let mut ctx = Ctx::train();
    let z = enc.forward(&st, xt, batch, &mut ctx).unwrap();
    assert_eq!(ctx.taps.len(), 3, "ln2, ffn and ffo are tapped");
    assert_eq!(ctx.taps[1].units, 6);
    assert_eq!((ctx.taps[1].positions, ctx.taps[1].batch), (tokens, batch));
    let loss = (z * dev.tensor_from_vec(rw.clone(), (batch, classes))).sum::<(), _>();
    let mut grads = loss.backward();
    let g = st.gradients(&mut grads).unwrap();
    let ids = st.trainable();
    let eps = 1e-2f32;
    let (mut checked, mut worst) = (0, 0f64);
    for (pi, &id) in ids.iter().enumerate() {
        for (j, &an) in g[pi].iter().enumerate() {
            let v0 = st.host(id)[j];
            st.host_mut(id)[j] = v0 + eps;
            st.sync(id);
            let up = loss64(&st);
            st.host_mut(id)[j] = v0 - eps;
            st.sync(id);
            let dn = loss64(&st);
            st.host_mut(id)[j] = v0;
            st.sync(id);
            let fd = (up - dn) / (2.0 * eps as f64);
            let an = an as f64;
            let err = (fd - an).abs() / (fd.abs() + an.abs()).max(1e-2);
            worst = worst.max(err);
            assert!(
                err < 2e-2,
                "{}[{j}]: backward {an}, finite differences {fd}",
                st.name(id)
            );
            checked += 1;
        }
    }
    assert!(checked > 150, "checked {checked} coordinates");
    eprintln!("encoder gradients: {checked} coordinates, worst relative error {worst:.2e}");
}

/// The preset shrunk: a corpus (tones, or synthesized), one seed, a small encoder and a few
/// steps.
fn tiny_config(data: &str, data_dir: Option<&Path>) -> String {
    let mut t = preset();
    t.insert("name".into(), "speech-tiny".into());
    t.insert("seeds".into(), toml::Value::Array(vec![0.into()]));
    t.insert("eval_subset".into(), 16.into());
    if let Some(d) = data_dir {
        t.insert("data_dir".into(), d.display().to_string().into());
    }
    t.insert(
        "data".into(),
        toml::from_str::<toml::Table>(data).unwrap().into(),
    );
    let aug: toml::Table =
        toml::from_str("snr_db = [10.0, 20.0]\nshift_ms = 50.0\ncopies = 1\n").unwrap();
    t.insert("augment".into(), aug.into());
    let model: toml::Table =
        toml::from_str("d_model = 16\nheads = 2\nd_ff = 32\nlayers = 1\npatch = 4\n").unwrap();
    t.insert("model".into(), model.into());
    let train: toml::Table =
        toml::from_str("epochs = 2\nbatch_size = 8\nlr = 0.003\ncheckpoint_every = 1\n").unwrap();
    t.insert("train".into(), train.into());
    let pr: toml::Table = toml::from_str(
        "[schedule]\nwarmup_steps = 2\nrefresh_every = 3\n[tracker]\nkind = \"ema_on_rate\"\n",
    )
    .unwrap();
    t.insert("pruning".into(), pr.into());
    let arms: toml::Table = toml::from_str(
        "[[arms]]\nname = \"dense\"\nprune = false\n\
         [[arms]]\nname = \"bb_sp_in\"\ndensities = [0.5]\n\
         [arms.pruning.policy]\nkind = \"balance\"\nbeta = 0.1\n[arms.pruning.actuator]\nkind = \"sp_in\"\n\
         [[arms]]\nname = \"bb_sp_out\"\ndensities = [0.5]\n\
         [arms.pruning.policy]\nkind = \"balance\"\nbeta = 0.1\n[arms.pruning.actuator]\nkind = \"sp_out\"\n",
    )
    .unwrap();
    t.insert("arms".into(), arms["arms"].clone());
    toml::to_string(&t).unwrap()
}

fn check_run(dir: &Path, pruned: bool, arm: &str) {
    let r = read_result(&dir.join(arm).join("seed-0")).unwrap();
    for k in ["accuracy", "acc_head", "acc_mid", "acc_tail"] {
        let v = r.metrics[k];
        assert!(
            v.is_finite() && (0.0..=1.0).contains(&v),
            "{arm}: {k} = {v}"
        );
    }
    let ffn: Vec<_> = r.layers.iter().filter(|l| l.pruned).collect();
    if pruned {
        assert_eq!(ffn.len(), 2, "{arm}: both FFN projections are pruned");
        for l in ffn {
            assert!(
                (l.achieved_density - 0.5).abs() < 1e-9,
                "{arm}: {} at density {}",
                l.layer,
                l.achieved_density
            );
        }
        assert!((r.achieved_density - 0.5).abs() < 1e-9);
    } else {
        assert!(ffn.is_empty());
    }
    assert_eq!(
        r.populations.len(),
        1,
        "{arm}: the FFN hidden units are reported"
    );
    assert!(r.populations[0].entropy_bits.is_finite());
}

#[test]
fn tiny_experiment_runs_end_to_end_on_tones() {
    let tmp = TempDir::unmade("speech-tones");
    let text = tiny_config(
        "source = \"tones\"\nwords = 6\nmax_per_word = 24\nmin_per_word = 4\ntest_per_word = 4\n\
         tone_voices = 5\nclip_ms = 500\n",
        None,
    );
    let cfg = SpeechConfig::from_toml(&text).unwrap();
    cfg.validate().unwrap();
    let dir = tmp.0.join("run");
    run_in(&text, &dir, true, true, None).unwrap();
    check_run(&dir, false, "dense");
    check_run(&dir, true, "bb_sp_in-d0.5");
    check_run(&dir, true, "bb_sp_out-d0.5");
    let rep = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(rep.contains("stand-in") && rep.contains("tail words"));
    assert!(rep.contains("±") || rep.contains("-"));

    // bad configs name the field
    let bad = text.replace("patch = 4", "patch = 0");
    let err = run_in(&bad, &tmp.0.join("bad"), true, true, None).unwrap_err();
    assert!(format!("{err:#}").contains("model.patch"), "{err:#}");
}

#[test]
fn tiny_synthesized_corpus_builds_resumes_and_trains() {
    if !synth::tools_available() {
        eprintln!("espeak-ng / flite not installed: skipped the synthesizer build (apt-get install -y espeak-ng flite)");
        return;
    }
    // every default accent gives distinct audio for two variants (a voice name espeak-ng
    // cannot resolve falls back silently to one voice)
    let spec: CorpusSpec = preset()["data"].clone().try_into().unwrap();
    let tmp = TempDir::unmade("speech-synth");
    std::fs::create_dir_all(&tmp.0).unwrap();
    let mut seen = std::collections::HashMap::new();
    for a in &spec.espeak_accents {
        for v in ["m3", "f2"] {
            let wav = tmp.0.join("probe.wav");
            let ok = std::process::Command::new("espeak-ng")
                .args(["-v", &format!("{a}+{v}"), "-w"])
                .arg(&wav)
                .arg("seven")
                .status()
                .unwrap()
                .success();
            assert!(ok, "espeak-ng -v {a}+{v} failed");
            let bytes = std::fs::read(&wav).unwrap();
            if let Some(other) = seen.insert(bytes, format!("{a}+{v}")) {
                panic!("espeak-ng voices {a}+{v} and {other} sound the same");
            }
        }
    }
    let data = "source = \"synth\"\nwords = 4\nmax_per_word = 6\nmin_per_word = 3\n\
                test_per_word = 2\nespeak_accents = [\"en-us\", \"en\"]\n\
                espeak_variants = [\"m1\", \"f2\", \"m3\"]\nflite_voices = [\"kal16\", \"slt\"]\n\
                heldout_flite = [\"slt\"]\nheldout_fraction = 0.34\nclip_ms = 800\n";
    let text = tiny_config(data, Some(&tmp.0));
    let cfg = SpeechConfig::from_toml(&text).unwrap();
    let dir = cfg.corpus_dir();
    assert!(dir.starts_with(&tmp.0));
    // not built yet: the error says how
    let err = run_in(&text, &tmp.0.join("early"), true, true, None).unwrap_err();
    assert!(format!("{err:#}").contains("bb speech build"), "{err:#}");
    let rep = synth::build(&cfg.data, &dir, 2, None).unwrap();
    assert_eq!(rep.made, rep.clips);
    // remove one clip: the next build makes only that one
    let first = std::fs::read_dir(dir.join("clips"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&first).unwrap();
    let rep2 = synth::build(&cfg.data, &dir, 2, None).unwrap();
    assert_eq!(rep2.made, 1);
    let corpus = cfg.load_corpus().unwrap();
    assert!(corpus
        .plan
        .clips
        .iter()
        .any(|c| corpus.plan.voices[c.voice].synth == synth::Synth::Flite));
    assert_eq!(corpus.audio[0].len(), 12800);
    let run = tmp.0.join("run");
    run_in(&text, &run, true, true, None).unwrap();
    check_run(&run, true, "bb_sp_in-d0.5");
    assert_eq!(cfg.data.source, Source::Synth);
}

/// The preset's grid resolves (33 runs; the per-layer actuators of the paired arm name real
/// layers) on a tiny generated corpus.
#[test]
fn preset_grid_resolves() {
    let mut t = preset();
    let data: toml::Table = toml::from_str(
        "source = \"tones\"\nwords = 6\nmax_per_word = 24\nmin_per_word = 4\ntest_per_word = 2\n\
         tone_voices = 4\nclip_ms = 500\n",
    )
    .unwrap();
    t.insert("data".into(), data.into());
    let train: toml::Table = toml::from_str("epochs = 1\nbatch_size = 8\nlr = 0.002\n").unwrap();
    t.insert("train".into(), train.into());
    let cfg = SpeechConfig::from_toml(&toml::to_string(&t).unwrap()).unwrap();
    let (runs, _, _) = bb_tasks::speech::plan(&cfg, &Cpu::default()).unwrap();
    assert_eq!(runs.len(), 33);
    let paired = runs.iter().find(|r| r.method == "bb_in_out").unwrap();
    let layers = paired.pruning.as_ref().unwrap()["layers"]
        .as_table()
        .unwrap();
    assert_eq!(
        layers["enc1.ff2"]["actuator"]["kind"].as_str(),
        Some("sp_out")
    );
    assert_eq!(layers["enc1.ff1"]["prune"].as_bool(), Some(true));
}
