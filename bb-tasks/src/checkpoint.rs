//! Run checkpoints, shared by the MLP trainer and the conv runner: a run folder's
//! `checkpoints/` holds one complete checkpoint folder at a time and a `LATEST` file naming it.
//!
//! A checkpoint is written in full to a temporary folder, moved into place, and only then named
//! in `LATEST` (itself written atomically) and the older ones removed, so a run stopped at any
//! moment leaves its previous checkpoint readable.

use crate::io::{safetensors_bytes, write_atomic, NamedTensor};
use crate::optim::Optimizer;
use anyhow::{anyhow, ensure, Context, Result};
use bb_core::Pruner;
use serde::Serialize;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

const LATEST: &str = "LATEST";

fn root(dir: &Path) -> PathBuf {
    dir.join("checkpoints")
}

/// Path of the latest complete checkpoint of a run folder, if any.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let p = root(dir).join(LATEST);
    if !p.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let c = root(dir).join(name.trim());
    ensure!(
        c.is_dir(),
        "{} names {}, which does not exist",
        p.display(),
        c.display()
    );
    Ok(Some(c))
}

/// Writes the checkpoint of `epoch` in run folder `dir`: the model's tensors and the
/// optimizer's state (both safetensors, with `meta`), the pruner's state when there is one,
/// and the run's own `state`; then makes it the latest and removes the others.
pub(crate) fn write_checkpoint<S: Serialize>(
    dir: &Path,
    epoch: usize,
    model: &[NamedTensor],
    meta: &HashMap<String, String>,
    opt: &Optimizer,
    pruner: Option<&Pruner>,
    state: &S,
) -> Result<()> {
    let root = root(dir);
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("epoch-{epoch:04}");
    let tmp = root.join(format!("{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    write_atomic(
        &tmp.join("model.safetensors"),
        &safetensors_bytes(model, meta)?,
    )?;
    let opt_tensors: Vec<NamedTensor> = opt
        .state_buffers()
        .into_iter()
        .map(|(name, d)| NamedTensor {
            name,
            shape: vec![d.len()],
            data: d.to_vec(),
        })
        .collect();
    write_atomic(
        &tmp.join("optimizer.safetensors"),
        &safetensors_bytes(&opt_tensors, meta)?,
    )?;
    if let Some(p) = pruner {
        let json = p.to_json().map_err(|e| anyhow!("pruner state: {e}"))?;
        write_atomic(&tmp.join("pruner.json"), json.as_bytes())?;
    }
    write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string(state)?.as_bytes(),
    )?;
    let dst = root.join(&name);
    if dst.exists() {
        fs::remove_dir_all(&dst)?;
    }
    fs::rename(&tmp, &dst)
        .with_context(|| format!("cannot move checkpoint to {}", dst.display()))?;
    write_atomic(&root.join(LATEST), name.as_bytes())?;
    // keep only the latest checkpoint
    for e in fs::read_dir(&root)? {
        let e = e?;
        if e.path().is_dir() && e.file_name().to_string_lossy() != name {
            fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimizerConfig;

    #[test]
    fn the_latest_checkpoint_replaces_the_others_and_stale_folders() {
        let dir = std::env::temp_dir().join(format!("bb-checkpoint-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(latest_checkpoint(&dir).unwrap(), None, "no checkpoint yet");
        let opt = Optimizer::new(OptimizerConfig::default(), &[3]);
        let w = |v: f32| {
            vec![NamedTensor {
                name: "w".into(),
                shape: vec![2],
                data: vec![v, -v],
            }]
        };
        let meta = HashMap::from([("checkpoint".to_string(), "{}".to_string())]);
        write_checkpoint(&dir, 1, &w(1.0), &meta, &opt, None, &("state", 1)).unwrap();
        // a folder left by a stopped writer
        fs::create_dir_all(dir.join("checkpoints/epoch-0002.tmp-1")).unwrap();
        write_checkpoint(&dir, 2, &w(2.0), &meta, &opt, None, &("state", 2)).unwrap();
        let ck = latest_checkpoint(&dir).unwrap().unwrap();
        assert_eq!(ck, dir.join("checkpoints/epoch-0002"));
        let mut names: Vec<String> = fs::read_dir(dir.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["LATEST", "epoch-0002"]);
        let state = fs::read_to_string(ck.join("state.json")).unwrap();
        assert_eq!(state, r#"["state",2]"#);
        let mut model = crate::io::TensorFile::read(&ck.join("model.safetensors")).unwrap();
        assert_eq!(model.take("w").unwrap(), [2.0, -2.0]);
        assert_eq!(model.metadata, meta);
        assert!(ck.join("optimizer.safetensors").is_file());
        assert!(
            !ck.join("pruner.json").exists(),
            "no pruner, no pruner state"
        );
        // LATEST naming a missing folder is an error that names the file
        fs::write(dir.join("checkpoints/LATEST"), "epoch-0009").unwrap();
        let e = latest_checkpoint(&dir).unwrap_err().to_string();
        assert!(e.contains("LATEST") && e.contains("epoch-0009"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
