//! Atomic file writes and f32 tensor files (safetensors).

use anyhow::{anyhow, ensure, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed to disk,
/// then renamed over `path`. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `rows` to `path` atomically as JSON lines, one row a line.
pub fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

/// A named f32 tensor with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Name in the file.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// Serializes f32 tensors in the safetensors format (little-endian), with string metadata.
pub fn safetensors_bytes(
    tensors: &[NamedTensor],
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        ensure!(
            t.shape.iter().product::<usize>() == t.data.len(),
            "tensor {} has {} values for shape {:?}",
            t.name,
            t.data.len(),
            t.shape
        );
        views.push((
            t.name.clone(),
            TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| anyhow!("{e:?}"))?,
        ));
    }
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(views, &meta).map_err(|e| anyhow!("safetensors: {e:?}"))
}

/// Parsed safetensors file: f32 tensors by name, and the metadata.
#[derive(Debug, Clone, Default)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: HashMap<String, NamedTensor>,
    /// String metadata.
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Reads a safetensors file of f32 tensors.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&bytes).with_context(|| format!("in {}", path.display()))
    }

    /// Parses safetensors bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let (_, meta) =
            SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("safetensors header: {e:?}"))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("safetensors: {e:?}"))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            ensure!(view.dtype() == Dtype::F32, "tensor {name} is not f32");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let shape = view.shape().to_vec();
            tensors.insert(name.clone(), NamedTensor { name, shape, data });
        }
        Ok(Self { tensors, metadata })
    }

    /// The values of tensor `name`.
    pub fn take(&mut self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .remove(name)
            .map(|t| t.data)
            .ok_or_else(|| anyhow!("tensor {name} missing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_is_exact() {
        let t = vec![
            NamedTensor {
                name: "a".into(),
                shape: vec![2, 3],
                data: vec![1.0, -0.0, f32::MIN_POSITIVE, 1e-38, 3.5, f32::MAX],
            },
            NamedTensor {
                name: "b".into(),
                shape: vec![1],
                data: vec![0.1],
            },
        ];
        let meta = HashMap::from([("epoch".to_string(), "3".to_string())]);
        let bytes = safetensors_bytes(&t, &meta).unwrap();
        let mut f = TensorFile::parse(&bytes).unwrap();
        assert_eq!(f.metadata["epoch"], "3");
        assert_eq!(f.tensors["a"], t[0]);
        let a = f.take("a").unwrap();
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            t[0].data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(f.take("zzz").is_err());
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("bb-io-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
