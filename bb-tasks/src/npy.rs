//! Reading and writing `.npy` files, with errors that name the file.

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{read_npy, write_npy, ReadNpyError};
use std::path::Path;

fn read_as<T: ndarray_npy::ReadableElement>(
    path: &Path,
) -> std::result::Result<ArrayD<T>, ReadNpyError> {
    read_npy::<_, ArrayD<T>>(path)
}

/// Reads an f32 or f64 array of any shape as f32.
pub fn read_f32(path: &Path) -> Result<ArrayD<f32>> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    match read_as::<f32>(path) {
        Ok(a) => Ok(a),
        Err(ReadNpyError::WrongDescriptor(_)) => {
            let a = read_as::<f64>(path)
                .with_context(|| format!("{}: expected an f32 or f64 array", path.display()))?;
            Ok(a.mapv(|x| x as f32))
        }
        Err(e) => Err(e).with_context(|| format!("{}: not a readable .npy file", path.display())),
    }
}

/// Reads an f32 or f64 array of any shape as f64.
pub fn read_f64(path: &Path) -> Result<ArrayD<f64>> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    match read_as::<f64>(path) {
        Ok(a) => Ok(a),
        Err(ReadNpyError::WrongDescriptor(_)) => {
            let a = read_as::<f32>(path)
                .with_context(|| format!("{}: expected an f32 or f64 array", path.display()))?;
            Ok(a.mapv(f64::from))
        }
        Err(e) => Err(e).with_context(|| format!("{}: not a readable .npy file", path.display())),
    }
}

/// Reads a 1-D f32/f64 array as `Vec<f64>`.
pub fn read_f64_1d(path: &Path) -> Result<Vec<f64>> {
    let a = read_f64(path)?;
    if a.ndim() != 1 {
        bail!(
            "{}: expected a 1-D array, got shape {:?}",
            path.display(),
            a.shape()
        );
    }
    Ok(a.iter().copied().collect())
}

/// Reads a 0/1 mask stored as u8, bool, i32, i64, f32 or f64 (any non-zero is live).
pub fn read_mask(path: &Path) -> Result<ArrayD<u8>> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    if let Ok(a) = read_as::<u8>(path) {
        return Ok(a);
    }
    if let Ok(a) = read_as::<bool>(path) {
        return Ok(a.mapv(u8::from));
    }
    if let Ok(a) = read_as::<i64>(path) {
        return Ok(a.mapv(|x| u8::from(x != 0)));
    }
    if let Ok(a) = read_as::<i32>(path) {
        return Ok(a.mapv(|x| u8::from(x != 0)));
    }
    let a = read_f64(path).with_context(|| format!("{}: expected a 0/1 mask", path.display()))?;
    Ok(a.mapv(|x| u8::from(x != 0.0)))
}

/// Writes an array, creating the file atomically (temp file + rename).
pub fn write_atomic<T: ndarray_npy::WritableElement>(path: &Path, a: &ArrayD<T>) -> Result<()> {
    let tmp = path.with_extension("npy.tmp");
    write_npy(&tmp, a).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// A dynamic-dimensional array from a shape and data.
pub fn array<T>(shape: &[usize], data: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(shape), data).context("array shape does not match its data")
}
