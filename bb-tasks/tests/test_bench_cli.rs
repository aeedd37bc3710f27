//! `bb bench --quick` writes a report with every section and finite ratios.

use std::process::Command;

#[test]
fn quick_bench_writes_every_section() {
    let out = std::env::temp_dir().join(format!("bb-bench-{}.md", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_bb"))
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    for section in [
        "### refresh",
        "### observe",
        "### sparse",
        "### training",
        "cores",
        "commit",
    ] {
        assert!(text.contains(section), "missing {section} in:\n{text}");
    }
    let ratios: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| case"))
        .map(|l| {
            l.split('|')
                .nth(4)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ratios.len() >= 20, "{} rows", ratios.len());
    assert!(
        ratios.iter().all(|r| r.is_finite() && *r > 0.0),
        "{ratios:?}"
    );
    std::fs::remove_file(&out).unwrap();
}
