//! Real-data readers on generated files: IDX decoding (raw and gzip), clear errors for missing
//! or corrupt files, the long-tailed class counts, the Shuttle table, and the fetch script's
//! checksum check.

mod common;

use bb_tasks::data::DataConfig;
use bb_tasks::realdata::{
    decode_idx, encode_idx, image_split, long_tail_counts, parse_shuttle, read_image_files,
    shuttle_split_from, ImageDataConfig, ImageSet, ShuttleConfig,
};
use common::{gzip, shuttle_csv, write_image_set, TempDir};
use std::path::Path;
use std::process::Command;

fn lt(
    dir: &Path,
    imbalance: Option<f64>,
    train: Option<usize>,
    test: Option<usize>,
) -> ImageDataConfig {
    ImageDataConfig {
        data_dir: Some(dir.to_path_buf()),
        imbalance,
        train_per_class: train,
        test_per_class: test,
    }
}

#[test]
fn idx_round_trips_raw_and_gzip() {
    let data: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 7) as u8).collect();
    let bytes = encode_idx(&[2, 3, 4], &data);
    assert_eq!(&bytes[..4], &[0, 0, 8, 3]);
    for b in [bytes.clone(), gzip(&bytes)] {
        let idx = decode_idx(&b).unwrap();
        assert_eq!(idx.dims, vec![2, 3, 4]);
        assert_eq!(idx.data, data);
    }
}

#[test]
fn corrupt_idx_bytes_are_rejected_with_the_reason() {
    let good = encode_idx(&[5], &[1, 2, 3, 4, 5]);
    let mut bad_magic = good.clone();
    bad_magic[0] = 7;
    assert!(decode_idx(&bad_magic)
        .unwrap_err()
        .to_string()
        .contains("magic"));
    let mut bad_type = good.clone();
    bad_type[2] = 0x0d; // float
    assert!(decode_idx(&bad_type)
        .unwrap_err()
        .to_string()
        .contains("element type"));
    let short = &good[..good.len() - 1];
    let e = decode_idx(short).unwrap_err().to_string();
    assert!(
        e.contains("payload has 4 bytes") && e.contains("need 5"),
        "{e}"
    );
    let gz = gzip(&good);
    let e = decode_idx(&gz[..gz.len() / 2]).unwrap_err().to_string();
    assert!(e.contains("gzip"), "{e}");
}

#[test]
fn image_sets_read_from_raw_and_gzip_files() {
    let t = TempDir::new("read");
    write_image_set(t.path(), "mnist", 12, 5);
    write_image_set(t.path(), "fashion-mnist", 7, 3);
    let m = read_image_files(ImageSet::Mnist, t.path()).unwrap();
    assert_eq!((m.pixels, m.train_y.len(), m.test_y.len()), (784, 120, 50));
    let f = read_image_files(ImageSet::FashionMnist, t.path()).unwrap();
    assert_eq!((f.train_y.len(), f.test_y.len()), (70, 30));
    // through the experiment config: full sets, pixels scaled to [0, 1]
    let s = image_split(ImageSet::Mnist, &lt(t.path(), None, None, None), 0).unwrap();
    assert_eq!(
        (s.train.len(), s.test.len(), s.train.features),
        (120, 50, 784)
    );
    assert!(s.train.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(s.train.x.contains(&1.0) || s.train.x.iter().any(|&v| v > 0.5));
    assert!(s.test.flagged.is_empty(), "balanced data flags nothing");
}

#[test]
fn a_missing_file_says_how_to_fetch_it() {
    let t = TempDir::new("missing");
    let e = format!(
        "{:#}",
        image_split(ImageSet::FashionMnist, &lt(t.path(), None, None, None), 0).unwrap_err()
    );
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    assert!(e.contains("not found"), "{e}");
    assert!(
        e.contains("scripts/fetch-data.sh") && e.contains("fashion-mnist"),
        "{e}"
    );
}

#[test]
fn a_corrupt_file_is_named_and_says_how_to_refetch() {
    let t = TempDir::new("corrupt");
    write_image_set(t.path(), "mnist", 3, 2);
    let p = t.path().join("mnist/t10k-images-idx3-ubyte");
    let mut b = std::fs::read(&p).unwrap();
    b.truncate(b.len() - 100);
    std::fs::write(&p, b).unwrap();
    let e = format!(
        "{:#}",
        read_image_files(ImageSet::Mnist, t.path()).unwrap_err()
    );
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("corrupt"),
        "{e}"
    );
    assert!(e.contains("scripts/fetch-data.sh"), "{e}");
    // labels out of range
    let t2 = TempDir::new("labels");
    write_image_set(t2.path(), "mnist", 3, 2);
    std::fs::write(
        t2.path().join("mnist/train-labels-idx1-ubyte"),
        encode_idx(&[30], &[11; 30]),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        read_image_files(ImageSet::Mnist, t2.path()).unwrap_err()
    );
    assert!(e.contains("label 11"), "{e}");
}

#[test]
fn long_tail_counts_follow_the_ratio_exactly() {
    // round(head * r^(-c/9)), worked out by hand from the definition
    assert_eq!(
        long_tail_counts(100, 10.0, 10),
        vec![100, 77, 60, 46, 36, 28, 22, 17, 13, 10]
    );
    let c = long_tail_counts(5421, 100.0, 10);
    assert_eq!(c[0], 5421);
    assert_eq!(c[9], 54); // 54.21
    assert_eq!(c[1], 3250); // 5421 * 100^(-1/9) = 3250.4
    assert!(c.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(long_tail_counts(50, 1.0, 4), vec![50; 4]);
}

#[test]
fn long_tailed_split_has_exact_counts_a_balanced_test_set_and_follows_the_seed() {
    let t = TempDir::new("lt");
    write_image_set(t.path(), "mnist", 110, 35);
    for (ratio, want) in [
        (10.0, vec![100, 77, 60, 46, 36, 28, 22, 17, 13, 10]),
        (100.0, vec![100, 60, 36, 22, 13, 8, 5, 3, 2, 1]),
    ] {
        let cfg = lt(t.path(), Some(ratio), Some(100), Some(30));
        let s = image_split(ImageSet::Mnist, &cfg, 7).unwrap();
        assert_eq!(s.train.class_counts(), want, "ratio {ratio}");
        assert_eq!(s.test.class_counts(), vec![30; 10]);
        // tail third (classes 7, 8, 9) flagged in the test set
        for (y, f) in s.test.y.iter().zip(&s.test.flagged) {
            assert_eq!(*f, *y >= 7);
        }
        // same seed: the same images; another seed: other images, the same counts
        let again = image_split(ImageSet::Mnist, &cfg, 7).unwrap();
        assert_eq!(again.train.x, s.train.x);
        let other = image_split(ImageSet::Mnist, &cfg, 8).unwrap();
        assert_eq!(other.train.class_counts(), want);
        assert_ne!(other.train.x, s.train.x);
        // the test set does not depend on the seed
        assert_eq!(other.test.x, s.test.x);
    }
    // defaults: the head is the rarest class's size (110 here), the test set as balanced as
    // the rarest test class allows
    let s = image_split(ImageSet::Mnist, &lt(t.path(), Some(10.0), None, None), 0).unwrap();
    assert_eq!(s.train.class_counts()[0], 110);
    assert_eq!(s.train.class_counts()[9], 11);
    assert_eq!(s.test.class_counts(), vec![35; 10]);
    // asking for more than exists names the field
    let e = format!(
        "{:#}",
        image_split(
            ImageSet::Mnist,
            &lt(t.path(), Some(10.0), Some(500), None),
            0
        )
        .unwrap_err()
    );
    assert!(e.contains("train_per_class") && e.contains("500"), "{e}");
}

#[test]
fn data_configs_parse_from_toml_and_bad_fields_are_named() {
    let t = TempDir::new("toml");
    write_image_set(t.path(), "fashion-mnist", 20, 10);
    let text = format!(
        "kind = \"fashion_mnist\"\ndata_dir = {:?}\nimbalance = 10.0\ntrain_per_class = 20\n",
        t.path().display().to_string()
    );
    let c: DataConfig = toml::from_str(&text).unwrap();
    assert_eq!(c.kind(), "fashion_mnist");
    let s = c.build(3).unwrap();
    assert_eq!(s.train.class_counts(), long_tail_counts(20, 10.0, 10));
    let e = toml::from_str::<DataConfig>("kind = \"mnist\"\nimbalanse = 10.0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("imbalanse"), "{e}");
    let c: DataConfig = toml::from_str("kind = \"mnist\"\nimbalance = 0.5\n").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("data.imbalance"), "{e}");
}

#[test]
fn the_data_dir_comes_from_the_config_then_the_flag_then_the_environment() {
    use bb_tasks::realdata::{data_dir, set_data_dir, DATA_DIR_ENV};
    let a = Path::new("/nonexistent/a");
    let b = Path::new("/nonexistent/b");
    set_data_dir(Some(b.to_path_buf()));
    assert_eq!(data_dir(Some(a)), a);
    assert_eq!(data_dir(None), b);
    set_data_dir(None);
    match std::env::var_os(DATA_DIR_ENV) {
        Some(v) if !v.is_empty() => assert_eq!(data_dir(None), Path::new(&v)),
        _ => assert!(data_dir(None).ends_with("data")),
    }
}

#[test]
fn shuttle_table_parses_splits_stratified_and_flags_anomalies() {
    let text = shuttle_csv(1000, 10);
    let table = parse_shuttle(&gzip(text.as_bytes())).unwrap();
    assert_eq!(table.y.len(), 1000);
    assert_eq!(table.y.iter().filter(|&&y| y == 1).count(), 100);
    let cfg = ShuttleConfig {
        data_dir: None,
        test_fraction: 0.3,
        max_rows: None,
    };
    let s = shuttle_split_from(&table, &cfg, 1).unwrap();
    assert_eq!(s.test.class_counts(), vec![270, 30]);
    assert_eq!(s.train.class_counts(), vec![630, 70]);
    assert_eq!(s.test.flagged.iter().filter(|&&f| f).count(), 30);
    // standardized with the training statistics
    for j in 0..9 {
        let m: f64 = s
            .train
            .x
            .iter()
            .skip(j)
            .step_by(9)
            .map(|&v| v as f64)
            .sum::<f64>()
            / 700.0;
        assert!(m.abs() < 1e-4, "feature {j} mean {m}");
    }
    assert_ne!(
        shuttle_split_from(&table, &cfg, 2).unwrap().test.x,
        s.test.x
    );
    let sub = shuttle_split_from(
        &table,
        &ShuttleConfig {
            max_rows: Some(200),
            ..cfg.clone()
        },
        1,
    )
    .unwrap();
    assert_eq!(sub.train.len() + sub.test.len(), 200);
    // a bad label names its line
    let bad = text.replacen(",1\n", ",7\n", 1);
    let e = parse_shuttle(bad.as_bytes()).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("\"7\""), "{e}");
    let e = parse_shuttle(b"a,b\n1,2\n").unwrap_err().to_string();
    assert!(e.contains("header"), "{e}");
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-data.sh")
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn fetch_script_verifies_checksums_and_reports_a_tampered_file() {
    if Command::new("sha256sum").arg("--version").output().is_err() {
        eprintln!("sha256sum not installed; skipping");
        return;
    }
    let t = TempDir::new("fetch");
    write_image_set(t.path(), "mnist", 2, 1);
    let names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    let mut manifest = String::from("# test manifest\n");
    for n in names {
        manifest.push_str(&format!(
            "{}  mnist/{n}\n",
            sha256(&t.path().join("mnist").join(n))
        ));
    }
    let mf = t.path().join("manifest.sha256");
    std::fs::write(&mf, manifest).unwrap();
    let verify = || {
        Command::new("bash")
            .arg(script())
            .args(["--verify", "--manifest"])
            .arg(&mf)
            .arg("--data-dir")
            .arg(t.path())
            .arg("mnist")
            .output()
            .unwrap()
    };
    let ok = verify();
    let err = String::from_utf8_lossy(&ok.stderr).into_owned();
    assert!(ok.status.success(), "{err}");
    assert!(err.contains("mnist: ok"), "{err}");
    // flip one byte of one file
    let p = t.path().join("mnist/train-labels-idx1-ubyte");
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&p, b).unwrap();
    let bad = verify();
    let err = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(!bad.status.success(), "a tampered file must fail: {err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("mnist/train-labels-idx1-ubyte"), "{err}");
    assert!(
        err.contains("fetch-data.sh"),
        "the report says how to re-fetch: {err}"
    );
    // a missing file is reported too
    std::fs::remove_file(t.path().join("mnist/t10k-images-idx3-ubyte")).unwrap();
    let gone = verify();
    let err = String::from_utf8_lossy(&gone.stderr).into_owned();
    assert!(!gone.status.success());
    assert!(
        err.contains("missing: mnist/t10k-images-idx3-ubyte"),
        "{err}"
    );
    // unknown set names are refused
    let out = Command::new("bash")
        .arg(script())
        .args(["--verify", "cifar"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument 'cifar'"));
}
