//! A small streaming safetensors writer (little-endian, row-major), so large pixel tensors go to
//! disk without an extra in-memory copy.

use std::io::{self, BufWriter, Write};
use std::path::Path;

/// A tensor to write: name, dtype and shape, and its values.
#[derive(Debug)]
pub enum TensorData<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// 64-bit signed integers.
    I64(&'a [i64]),
}

impl TensorData<'_> {
    fn dtype(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "F32",
            TensorData::I64(_) => "I64",
        }
    }

    fn byte_len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len() * 4,
            TensorData::I64(v) => v.len() * 8,
        }
    }

    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        // safetensors is little-endian; on little-endian hosts the values are written as they lie.
        #[cfg(target_endian = "little")]
        match self {
            TensorData::F32(v) => w.write_all(bytemuck::cast_slice(v)),
            TensorData::I64(v) => w.write_all(bytemuck::cast_slice(v)),
        }
        #[cfg(not(target_endian = "little"))]
        {
            let mut buf = Vec::with_capacity(1 << 16);
            match self {
                TensorData::F32(v) => v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                TensorData::I64(v) => v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            }
            w.write_all(&buf)
        }
    }
}

/// Writes `tensors` (name, shape, data) to `path` in the safetensors format.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, TensorData<'_>)]) -> io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let elems: usize = shape.iter().product();
        let per = if matches!(data, TensorData::F32(_)) { 4 } else { 8 };
        if elems * per != data.byte_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor {name}: shape {shape:?} does not match its data"),
            ));
        }
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": data.dtype(), "shape": shape, "data_offsets": [offset, offset + data.byte_len()]}),
        );
        offset += data.byte_len();
    }
    let mut text = serde_json::to_string(&header).map_err(io::Error::other)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    for (_, _, data) in tensors {
        data.write_to(&mut w)?;
    }
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}
