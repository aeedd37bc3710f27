//! Real data read from files fetched by `scripts/fetch-data.sh`: MNIST and Fashion-MNIST (IDX,
//! raw or gzip), their long-tailed variants, and the Statlog Shuttle rare-event table.
//!
//! Files are looked up in a data folder: the config's `data_dir`, else the folder set with
//! [`set_data_dir`] (`bb --data-dir`), else `$BB_DATA_DIR`, else `data/` at the repository
//! root (git-ignored). The layout is the one the fetch script writes:
//!
//! ```text
//! DIR/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte        (or the same names + .gz)
//! DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
//! DIR/shuttle/shuttle.csv.gz                                    (9 features + `anomaly`)
//! ```
//!
//! **Long-tailed variants.** With `imbalance = r`, class `c` of `C` keeps
//! `round(n_head * r^(-c / (C - 1)))` training samples (class 0 is the head, class `C - 1` the
//! tail, so `n_head / n_tail = r` up to rounding), drawn at random with the run's seed. The
//! test set is balanced: `test_per_class` samples of every class (default: as many as the
//! rarest test class has), drawn once, the same for every seed. Test samples of the tail third
//! of the classes are flagged, so the trainer's `flagged_recall` is the tail accuracy.

use crate::data::{Dataset, FeatureInfo, Split};
use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Environment variable naming the data folder.
pub const DATA_DIR_ENV: &str = "BB_DATA_DIR";

fn dir_override() -> &'static Mutex<Option<PathBuf>> {
    static D: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    D.get_or_init(|| Mutex::new(None))
}

/// Sets the process-wide data folder (what `bb --data-dir` does); it wins over
/// `$BB_DATA_DIR` and the default, but not over a config's own `data_dir`.
pub fn set_data_dir(dir: Option<PathBuf>) {
    *dir_override().lock().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// `data/` at the repository root.
pub fn default_data_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| PathBuf::from("data"), |root| root.join("data"))
}

/// The data folder: `explicit`, else [`set_data_dir`], else `$BB_DATA_DIR`, else
/// [`default_data_dir`].
pub fn data_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = dir_override()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return p;
    }
    match std::env::var_os(DATA_DIR_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => default_data_dir(),
    }
}

fn fetch_hint(set: &str, dir: &Path) -> String {
    format!(
        "fetch it with `scripts/fetch-data.sh --data-dir {} {set}` (or point --data-dir / {DATA_DIR_ENV} at a folder holding {set}/)",
        dir.display()
    )
}

/// An IDX array: dimensions and the `u8` payload, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idx {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Values.
    pub data: Vec<u8>,
}

/// Encodes a `u8` IDX array (magic `00 00 08 N`, N big-endian u32 dimensions, payload).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    assert_eq!(
        dims.iter().product::<usize>(),
        data.len(),
        "IDX: payload size"
    );
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Decodes IDX bytes (gzip-compressed or raw; `u8` payload only). Errors say what is wrong.
pub fn decode_idx(bytes: &[u8]) -> Result<Idx> {
    let raw;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut v)
            .map_err(|e| anyhow!("gzip stream is damaged ({e})"))?;
        raw = v;
        &raw[..]
    } else {
        bytes
    };
    ensure!(
        bytes.len() >= 4,
        "too short for an IDX header ({} bytes)",
        bytes.len()
    );
    ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "bad IDX magic {:02x} {:02x} {:02x} {:02x} (expected 00 00 08 0N)",
        bytes[0],
        bytes[1],
        bytes[2],
        bytes[3]
    );
    ensure!(
        bytes[2] == 0x08,
        "IDX element type 0x{:02x} is not unsigned bytes (0x08)",
        bytes[2]
    );
    let nd = bytes[3] as usize;
    ensure!(nd >= 1, "IDX header declares no dimensions");
    let head = 4 + 4 * nd;
    ensure!(bytes.len() >= head, "IDX header is truncated");
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    ensure!(
        bytes.len() - head == n,
        "IDX payload has {} bytes but the dimensions {dims:?} need {n}",
        bytes.len() - head
    );
    Ok(Idx {
        dims,
        data: bytes[head..].to_vec(),
    })
}

/// The two image sets with the same IDX layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSet {
    /// Handwritten digits.
    Mnist,
    /// Zalando's clothing images.
    FashionMnist,
}

impl ImageSet {
    /// Sub-folder of the data folder (and the fetch script's set name).
    pub fn folder(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion-mnist",
        }
    }

    /// Display name.
    pub fn title(self) -> &'static str {
        match self {
            Self::Mnist => "MNIST",
            Self::FashionMnist => "Fashion-MNIST",
        }
    }
}

/// Images (`u8`, `[n, rows * cols]`) and labels of one image set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFiles {
    /// Pixels per image.
    pub pixels: usize,
    /// Training images.
    pub train_x: Vec<u8>,
    /// Training labels (0..=9).
    pub train_y: Vec<u8>,
    /// Test images.
    pub test_x: Vec<u8>,
    /// Test labels.
    pub test_y: Vec<u8>,
}

/// Number of classes of both image sets.
pub const IMAGE_CLASSES: usize = 10;

fn read_idx_file(dir: &Path, set: &str, name: &str) -> Result<Idx> {
    let base = dir.join(set);
    let raw = base.join(name);
    let gz = base.join(format!("{name}.gz"));
    let path = if raw.is_file() {
        raw
    } else if gz.is_file() {
        gz
    } else {
        bail!(
            "data file {} (or {}.gz) not found; {}",
            raw.display(),
            name,
            fetch_hint(set, dir)
        );
    };
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_idx(&bytes).map_err(|e| {
        anyhow!(
            "data file {} is corrupt: {e}; delete it and {}",
            path.display(),
            fetch_hint(set, dir)
        )
    })
}

/// Reads and checks the four IDX files of `set` under `dir` (no caching).
pub fn read_image_files(set: ImageSet, dir: &Path) -> Result<ImageFiles> {
    let f = set.folder();
    let part = |images: &str, labels: &str| -> Result<(usize, Vec<u8>, Vec<u8>)> {
        let x = read_idx_file(dir, f, images)?;
        let y = read_idx_file(dir, f, labels)?;
        let bad = |what: String| anyhow!("{}/{f}: {what}; {}", dir.display(), fetch_hint(f, dir));
        if x.dims.len() != 3 {
            return Err(bad(format!(
                "{images} has dimensions {:?}, expected [n, rows, cols]",
                x.dims
            )));
        }
        if y.dims.len() != 1 {
            return Err(bad(format!(
                "{labels} has dimensions {:?}, expected [n]",
                y.dims
            )));
        }
        if x.dims[0] != y.dims[0] {
            return Err(bad(format!(
                "{images} holds {} images but {labels} {} labels",
                x.dims[0], y.dims[0]
            )));
        }
        if let Some(&l) = y.data.iter().find(|&&l| l as usize >= IMAGE_CLASSES) {
            return Err(bad(format!("{labels} holds label {l}, expected 0..=9")));
        }
        Ok((x.dims[1] * x.dims[2], x.data, y.data))
    };
    let (p_train, train_x, train_y) = part("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let (p_test, test_x, test_y) = part("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    ensure!(
        p_train == p_test,
        "{}/{}: training images have {p_train} pixels, test images {p_test}",
        dir.display(),
        f
    );
    Ok(ImageFiles {
        pixels: p_train,
        train_x,
        train_y,
        test_x,
        test_y,
    })
}

/// [`read_image_files`], cached per (set, folder) for the life of the process (a sweep builds
/// the data of many runs from the same files).
pub fn image_files(set: ImageSet, dir: &Path) -> Result<Arc<ImageFiles>> {
    type Cache = Mutex<HashMap<(ImageSet, PathBuf), Arc<ImageFiles>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (
        set,
        dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
    );
    if let Some(f) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let f = Arc::new(read_image_files(set, dir)?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, f.clone());
    Ok(f)
}

fn d_test_fraction() -> f64 {
    0.3
}

/// `[data]` parameters of `kind = "mnist"` and `kind = "fashion_mnist"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDataConfig {
    /// Folder holding `mnist/` and `fashion-mnist/` (default: see the module docs).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Long-tail imbalance ratio `n_head / n_tail` (e.g. 10 or 100); absent: no long tail.
    #[serde(default)]
    pub imbalance: Option<f64>,
    /// Training samples of the head class (long-tailed) or of every class (balanced subset).
    /// Default: as many as the rarest class has when `imbalance` is set, all data otherwise.
    #[serde(default)]
    pub train_per_class: Option<usize>,
    /// Test samples of every class (a balanced test set). Default: as many as the rarest test
    /// class has when `imbalance` is set, the whole test set otherwise.
    #[serde(default)]
    pub test_per_class: Option<usize>,
}

impl ImageDataConfig {
    /// Checks the parameters; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = self.imbalance {
            ensure!(
                r.is_finite() && r >= 1.0,
                "data.imbalance must be a ratio >= 1 (e.g. 10 or 100), got {r}"
            );
        }
        ensure!(
            self.train_per_class != Some(0),
            "data.train_per_class must be >= 1"
        );
        ensure!(
            self.test_per_class != Some(0),
            "data.test_per_class must be >= 1"
        );
        Ok(())
    }
}

/// Training samples per class of a long-tailed set: `round(head * ratio^(-c / (classes - 1)))`
/// for class `c`, never below 1.
pub fn long_tail_counts(head: usize, ratio: f64, classes: usize) -> Vec<usize> {
    if classes <= 1 {
        return vec![head; classes];
    }
    (0..classes)
        .map(|c| {
            let e = -(c as f64) / (classes - 1) as f64;
            ((head as f64 * ratio.powf(e)).round() as usize).max(1)
        })
        .collect()
}

fn by_class(labels: &[u8], classes: usize) -> Vec<Vec<usize>> {
    let mut idx = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        idx[l as usize].push(i);
    }
    idx
}

/// Picks `counts[c]` indices of each class at random (sorted on return); errors when a class
/// has fewer samples than asked for.
fn pick_per_class(
    pools: &[Vec<usize>],
    counts: &[usize],
    rng: &mut ChaCha8Rng,
    what: &str,
) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for (c, (pool, &n)) in pools.iter().zip(counts).enumerate() {
        ensure!(
            n <= pool.len(),
            "{what}: class {c} has {} samples, {n} were asked for",
            pool.len()
        );
        let mut p = pool.clone();
        p.shuffle(rng);
        out.extend_from_slice(&p[..n]);
    }
    out.sort_unstable();
    Ok(out)
}

fn to_dataset(x: &[u8], y: &[u8], pixels: usize, idx: &[usize]) -> Dataset {
    let mut xs = Vec::with_capacity(idx.len() * pixels);
    let mut ys = Vec::with_capacity(idx.len());
    for &i in idx {
        xs.extend(
            x[i * pixels..(i + 1) * pixels]
                .iter()
                .map(|&v| v as f32 / 255.0),
        );
        ys.push(y[i] as usize);
    }
    Dataset {
        features: pixels,
        classes: IMAGE_CLASSES,
        x: xs,
        y: ys,
        flagged: Vec::new(),
    }
}

/// The train/test split of an image set for `seed` (see the module docs).
pub fn image_split(set: ImageSet, cfg: &ImageDataConfig, seed: u64) -> Result<Split> {
    cfg.validate()?;
    let dir = data_dir(cfg.data_dir.as_deref());
    let files = image_files(set, &dir)?;
    image_split_from(set, &files, cfg, seed)
}

/// [`image_split`] from files already read.
pub fn image_split_from(
    set: ImageSet,
    files: &ImageFiles,
    cfg: &ImageDataConfig,
    seed: u64,
) -> Result<Split> {
    cfg.validate()?;
    let k = IMAGE_CLASSES;
    let train_pools = by_class(&files.train_y, k);
    let test_pools = by_class(&files.test_y, k);
    let rarest = |pools: &[Vec<usize>]| pools.iter().map(Vec::len).min().unwrap_or(0);
    let name = set.title();
    let train_idx = match (cfg.imbalance, cfg.train_per_class) {
        (None, None) => (0..files.train_y.len()).collect(),
        (imb, per) => {
            let head = per.unwrap_or_else(|| rarest(&train_pools));
            let counts = match imb {
                Some(r) => long_tail_counts(head, r, k),
                None => vec![head; k],
            };
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4c54_5f74_7261_696e);
            pick_per_class(
                &train_pools,
                &counts,
                &mut rng,
                &format!("{name} training set (data.train_per_class)"),
            )?
        }
    };
    let test_idx = match (cfg.imbalance, cfg.test_per_class) {
        (None, None) => (0..files.test_y.len()).collect(),
        (_, per) => {
            let n = per.unwrap_or_else(|| rarest(&test_pools));
            // the same balanced test set for every seed
            let mut rng = ChaCha8Rng::seed_from_u64(0x004c_545f_7465_7374);
            pick_per_class(
                &test_pools,
                &vec![n; k],
                &mut rng,
                &format!("{name} test set (data.test_per_class)"),
            )?
        }
    };
    let train = to_dataset(&files.train_x, &files.train_y, files.pixels, &train_idx);
    let mut test = to_dataset(&files.test_x, &files.test_y, files.pixels, &test_idx);
    let mut flag_name = None;
    let counts = train.class_counts();
    if crate::stats::Buckets::is_imbalanced(&counts) {
        let tail = crate::stats::Buckets::from_counts(&counts).tail;
        test.flagged = test.y.iter().map(|y| tail.contains(y)).collect();
        flag_name = Some("tail classes".to_string());
    }
    Ok(Split {
        train,
        test,
        features: FeatureInfo {
            group: vec!["pixel".to_string(); files.pixels],
            p_on: vec![None; files.pixels],
        },
        flag_name,
    })
}

/// `[data]` parameters of `kind = "shuttle"`: the Statlog Shuttle table as a rare-event task
/// (class 1 = anomaly, 7.15 % of the rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShuttleConfig {
    /// Folder holding `shuttle/` (default: see the module docs).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Fraction of each class held out for evaluation (default 0.3).
    #[serde(default = "d_test_fraction")]
    pub test_fraction: f64,
    /// Keep only this many rows (a stratified subset, before splitting); default all.
    #[serde(default)]
    pub max_rows: Option<usize>,
}

impl ShuttleConfig {
    /// Checks the parameters; errors name the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.test_fraction > 0.0 && self.test_fraction < 1.0,
            "data.test_fraction must be in (0, 1), got {}",
            self.test_fraction
        );
        ensure!(self.max_rows != Some(0), "data.max_rows must be >= 1");
        Ok(())
    }
}

/// Rows of the Shuttle table: 9 features and the anomaly label.
#[derive(Debug, Clone, PartialEq)]
pub struct ShuttleTable {
    /// `[n, 9]` row-major.
    pub x: Vec<f32>,
    /// 1 = anomaly.
    pub y: Vec<usize>,
}

/// Features of the Shuttle table.
pub const SHUTTLE_FEATURES: usize = 9;

/// Parses the Shuttle CSV (header `f1,...,f9,anomaly`; gzip or plain).
pub fn parse_shuttle(bytes: &[u8]) -> Result<ShuttleTable> {
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| anyhow!("gzip stream is damaged ({e})"))?;
    } else {
        text = String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("not UTF-8 text"))?;
    }
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| anyhow!("empty file"))?;
    let cols: Vec<&str> = header.trim().split(',').collect();
    ensure!(
        cols.len() == SHUTTLE_FEATURES + 1 && cols[SHUTTLE_FEATURES] == "anomaly",
        "header {header:?} is not f1,...,f9,anomaly"
    );
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Vec<&str> = line.trim().split(',').collect();
        ensure!(
            v.len() == SHUTTLE_FEATURES + 1,
            "line {} has {} values, expected {}",
            i + 2,
            v.len(),
            SHUTTLE_FEATURES + 1
        );
        for s in &v[..SHUTTLE_FEATURES] {
            let f: f32 = s
                .parse()
                .map_err(|_| anyhow!("line {}: bad number {s:?}", i + 2))?;
            x.push(f);
        }
        y.push(match v[SHUTTLE_FEATURES] {
            "0" => 0,
            "1" => 1,
            l => bail!("line {}: label {l:?} is not 0 or 1", i + 2),
        });
    }
    ensure!(!y.is_empty(), "no data rows");
    Ok(ShuttleTable { x, y })
}

/// Reads `DIR/shuttle/shuttle.csv.gz` (or `shuttle.csv`).
pub fn read_shuttle(dir: &Path) -> Result<ShuttleTable> {
    let base = dir.join("shuttle");
    let gz = base.join("shuttle.csv.gz");
    let plain = base.join("shuttle.csv");
    let path = if gz.is_file() {
        gz
    } else if plain.is_file() {
        plain
    } else {
        bail!(
            "data file {} not found; {}",
            gz.display(),
            fetch_hint("shuttle", dir)
        );
    };
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_shuttle(&bytes).map_err(|e| {
        anyhow!(
            "data file {} is corrupt: {e}; delete it and {}",
            path.display(),
            fetch_hint("shuttle", dir)
        )
    })
}

/// The Shuttle split for `seed`: stratified, features standardized with the training set's
/// mean and standard deviation, anomalies flagged in the test set (so the trainer's
/// `flagged_recall` is the rare-class recall).
pub fn shuttle_split(cfg: &ShuttleConfig, seed: u64) -> Result<Split> {
    cfg.validate()?;
    let table = read_shuttle(&data_dir(cfg.data_dir.as_deref()))?;
    shuttle_split_from(&table, cfg, seed)
}

/// [`shuttle_split`] from a table already read.
pub fn shuttle_split_from(table: &ShuttleTable, cfg: &ShuttleConfig, seed: u64) -> Result<Split> {
    cfg.validate()?;
    let f = SHUTTLE_FEATURES;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5348_5554);
    let n = table.y.len();
    let keep = cfg.max_rows.unwrap_or(n).min(n);
    let (mut tr, mut te) = (Vec::new(), Vec::new());
    for c in 0..2 {
        let mut idx: Vec<usize> = (0..n).filter(|&i| table.y[i] == c).collect();
        ensure!(
            idx.len() >= 2,
            "shuttle: class {c} has {} rows; at least 2 are needed to split",
            idx.len()
        );
        idx.shuffle(&mut rng);
        let share = (idx.len() as f64 * keep as f64 / n as f64).round() as usize;
        idx.truncate(share.max(2).min(idx.len()));
        let n_test =
            ((cfg.test_fraction * idx.len() as f64).round() as usize).clamp(1, idx.len() - 1);
        te.extend_from_slice(&idx[..n_test]);
        tr.extend_from_slice(&idx[n_test..]);
    }
    tr.sort_unstable();
    te.sort_unstable();
    let mut mean = vec![0f64; f];
    let mut sq = vec![0f64; f];
    for &i in &tr {
        for j in 0..f {
            let v = table.x[i * f + j] as f64;
            mean[j] += v;
            sq[j] += v * v;
        }
    }
    let m = tr.len() as f64;
    let sd: Vec<f64> = (0..f)
        .map(|j| {
            mean[j] /= m;
            (sq[j] / m - mean[j] * mean[j]).max(0.0).sqrt().max(1e-6)
        })
        .collect();
    let pick = |idx: &[usize]| {
        let mut d = Dataset {
            features: f,
            classes: 2,
            x: Vec::with_capacity(idx.len() * f),
            y: Vec::with_capacity(idx.len()),
            flagged: Vec::new(),
        };
        for &i in idx {
            for j in 0..f {
                d.x.push(((table.x[i * f + j] as f64 - mean[j]) / sd[j]) as f32);
            }
            d.y.push(table.y[i]);
        }
        d
    };
    let train = pick(&tr);
    let mut test = pick(&te);
    test.flagged = test.y.iter().map(|&y| y == 1).collect();
    Ok(Split {
        train,
        test,
        features: FeatureInfo {
            group: vec!["sensor".to_string(); f],
            p_on: vec![None; f],
        },
        flag_name: Some("anomalies".to_string()),
    })
}
