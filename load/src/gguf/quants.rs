//! Byte layouts of the GGUF tensor types tern reads, decoders and the ternary encoders.
//!
//! Elements are numbered by flat index `i` (row-major, `ne[0]` contiguous); ternary values are
//! `code - 1` for 2-bit codes 0/1/2 (code 3 is invalid).
//!
//! - **I2_S** (bitnet.cpp, x86 layout): `n/4` code bytes, then a 32-byte tail whose first 4 bytes are
//!   the per-tensor f32 scale (the rest is undefined; written as zeros). Per 128 consecutive
//!   elements, 32 bytes: byte `b` holds elements `b, b+32, b+64, b+96` in bits `7:6, 5:4, 3:2, 1:0`.
//! - **TQ2_0**: blocks of 256 elements, 66 bytes: `qs[64]`, f16 `d`. Element `j` is in
//!   `qs[32*(j/128) + j%32]` at bits `2*((j%128)/32)`.
//! - **TQ1_0**: blocks of 256, 54 bytes: `qs[48]`, `qh[4]`, f16 `d`. Each byte is a base-3 fixed-point
//!   number, first element in the most significant trit; trit `t` of byte `q` is
//!   `((q * 3^t) mod 256) * 3 >> 8`. `qs[m]` (m < 32) holds elements `m + 32t` (t < 5), `qs[32+m]`
//!   (m < 16) elements `160 + m + 16t`, `qh[m]` (m < 4) elements `240 + m + 4t` (t < 4).
//! - **Q8_0**: blocks of 32, 34 bytes: f16 `d`, `i8 q[32]`; `x = d*q`.
//! - **Q4_0**: blocks of 32, 18 bytes: f16 `d`, `qs[16]`; `x[j] = d*((qs[j] & 15) - 8)`,
//!   `x[j+16] = d*((qs[j] >> 4) - 8)`.
//! - **Q6_K**: blocks of 256, 210 bytes: `ql[128]`, `qh[64]`, `i8 scales[16]`, f16 `d`; 6-bit
//!   values minus 32, one scale per 16 elements (ggml's `dequantize_row_q6_K`).
//!
//! A TQ block stores its own scale `d`; the canonical representation has one per tensor, so every
//! block that holds a non-zero value must carry the same `d` (a block of zeros may carry any).

use super::GgmlType;
use anyhow::{Result, bail, ensure};
use half::{bf16, f16};

pub const I2S_GROUP: usize = 128;
pub const I2S_TAIL: usize = 32;
const QK: usize = 256;
const TQ2_BYTES: usize = 66;
const TQ1_BYTES: usize = 54;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

fn code_value(code: u8, i: usize) -> Result<i8> {
    ensure!(code != 3, invalid_code(i));
    Ok(code as i8 - 1)
}

fn invalid_code(i: usize) -> String {
    format!("element {i} holds the 2-bit code 3, which is not a ternary value")
}

/// Decodes a ternary tensor of `n` elements to values and its per-tensor scale.
/// `data` has exactly the tensor's size (checked by the reader).
pub fn ternary_values(t: GgmlType, data: &[u8], n: usize) -> Result<(Vec<i8>, f32)> {
    let mut values = vec![0i8; n];
    let scale = match t {
        GgmlType::I2S => {
            // Plain loops that vectorize (loading decodes every weight here); a code 3 is found
            // afterwards.
            let mut any_invalid = false;
            for (group, out) in data[..n / 4]
                .chunks_exact(32)
                .zip(values.chunks_exact_mut(I2S_GROUP))
            {
                for (lane, out) in out.chunks_exact_mut(32).enumerate() {
                    for (v, &byte) in out.iter_mut().zip(group) {
                        let code = (byte >> (6 - 2 * lane)) & 3;
                        any_invalid |= code == 3;
                        *v = code as i8 - 1;
                    }
                }
            }
            if any_invalid {
                let i = values.iter().position(|&v| v == 2).expect("a code 3");
                bail!(invalid_code(i));
            }
            let s = &data[n / 4..n / 4 + 4];
            f32::from_le_bytes([s[0], s[1], s[2], s[3]])
        }
        GgmlType::Tq2_0 | GgmlType::Tq1_0 => {
            let block_bytes = if t == GgmlType::Tq2_0 {
                TQ2_BYTES
            } else {
                TQ1_BYTES
            };
            let mut scale: Option<f32> = None;
            for (blk, (block, out)) in data
                .chunks_exact(block_bytes)
                .zip(values.chunks_exact_mut(QK))
                .enumerate()
            {
                if t == GgmlType::Tq2_0 {
                    decode_tq2_block(block, out, blk * QK)?;
                } else {
                    decode_tq1_block(block, out);
                }
                let d = f16_at(block, block_bytes - 2);
                if out.iter().any(|&v| v != 0) {
                    match scale {
                        None => scale = Some(d),
                        Some(s) if s.to_bits() == d.to_bits() => {}
                        Some(s) => bail!(
                            "block {blk} has scale {d} where earlier blocks have {s}: a {} tensor \
                             with per-block scales is not a per-tensor ternary matrix",
                            t.name()
                        ),
                    }
                }
            }
            scale.unwrap_or(0.0)
        }
        other => bail!("{} is not a ternary type", other.name()),
    };
    ensure!(scale.is_finite(), "scale {scale} is not finite");
    Ok((values, scale))
}

fn decode_tq2_block(block: &[u8], out: &mut [i8], first: usize) -> Result<()> {
    for (j, v) in out.iter_mut().enumerate() {
        let byte = block[32 * (j / 128) + j % 32];
        *v = code_value((byte >> (2 * ((j % 128) / 32))) & 3, first + j)?;
    }
    Ok(())
}

fn trit(q: u8, t: u32) -> i8 {
    let shifted = q.wrapping_mul(3u8.pow(t));
    ((u16::from(shifted) * 3) >> 8) as i8 - 1
}

fn decode_tq1_block(block: &[u8], out: &mut [i8]) {
    for m in 0..32 {
        for t in 0..5 {
            out[m + 32 * t] = trit(block[m], t as u32);
        }
    }
    for m in 0..16 {
        for t in 0..5 {
            out[160 + m + 16 * t] = trit(block[32 + m], t as u32);
        }
    }
    for m in 0..4 {
        for t in 0..4 {
            out[240 + m + 4 * t] = trit(block[48 + m], t as u32);
        }
    }
}

/// Encodes ternary values (`n` a multiple of 128) as I2_S with `scale`; the tail after the scale is
/// zeros.
pub fn encode_i2s(values: &[i8], scale: f32) -> Vec<u8> {
    let mut out = vec![0u8; values.len() / 4 + I2S_TAIL];
    for (g, group) in values.chunks_exact(I2S_GROUP).enumerate() {
        for b in 0..32 {
            out[g * 32 + b] = (0..4).fold(0u8, |byte, lane| {
                byte | (((group[lane * 32 + b] + 1) as u8) << (6 - 2 * lane))
            });
        }
    }
    let n = values.len() / 4;
    out[n..n + 4].copy_from_slice(&scale.to_le_bytes());
    out
}

/// The f16 block scale of a block: `scale`, or 0 for a block of zeros (as ggml's quantizers write).
fn block_scale(block: &[i8], scale: f32) -> [u8; 2] {
    let d = if block.iter().all(|&v| v == 0) {
        0.0
    } else {
        scale
    };
    f16::from_f32(d).to_bits().to_le_bytes()
}

/// Encodes ternary values (`n` a multiple of 256) as TQ2_0, every block with scale `scale`.
pub fn encode_tq2_0(values: &[i8], scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / QK * TQ2_BYTES);
    for block in values.chunks_exact(QK) {
        let mut qs = [0u8; 64];
        for (j, &v) in block.iter().enumerate() {
            qs[32 * (j / 128) + j % 32] |= ((v + 1) as u8) << (2 * ((j % 128) / 32));
        }
        out.extend_from_slice(&qs);
        out.extend_from_slice(&block_scale(block, scale));
    }
    out
}

/// A base-3 fixed-point byte of `trits` (first = most significant), `pad` extra zero trits below.
fn tq1_byte(trits: impl Iterator<Item = i8>, pad: u32) -> u8 {
    let q = trits.fold(0u16, |q, v| q * 3 + (v + 1) as u16) * 3u16.pow(pad);
    // Ceiling division by 3^5, as ggml's quantize_row_tq1_0_ref.
    (q * 256).div_ceil(243) as u8
}

/// Encodes ternary values (`n` a multiple of 256) as TQ1_0, every block with scale `scale`.
pub fn encode_tq1_0(values: &[i8], scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / QK * TQ1_BYTES);
    for block in values.chunks_exact(QK) {
        for m in 0..32 {
            out.push(tq1_byte((0..5).map(|t| block[m + 32 * t]), 0));
        }
        for m in 0..16 {
            out.push(tq1_byte((0..5).map(|t| block[160 + m + 16 * t]), 0));
        }
        for m in 0..4 {
            out.push(tq1_byte((0..4).map(|t| block[240 + m + 4 * t]), 1));
        }
        out.extend_from_slice(&block_scale(block, scale));
    }
    out
}

/// Decodes a dense (or dense-quantized) tensor of `n` elements to f32.
pub fn dense_values(t: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n);
    match t {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|b| f16_at(b, 0))),
        GgmlType::Bf16 => out.extend(
            data.chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for block in data.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 => {
            for block in data.chunks_exact(18) {
                let d = f16_at(block, 0);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| d * (f32::from(q & 15) - 8.0)));
                out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
            }
        }
        GgmlType::Q6K => {
            for block in data.chunks_exact(210) {
                let (ql, rest) = block.split_at(128);
                let (qh, rest) = rest.split_at(64);
                let (scales, d) = rest.split_at(16);
                let d = f16_at(d, 0);
                let mut y = [0f32; QK];
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    let sc = &scales[8 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 15) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (k, &q) in q.iter().enumerate() {
                            let s = f32::from(sc[is + 2 * k] as i8);
                            y[128 * half + l + 32 * k] = d * s * f32::from(q as i8 - 32);
                        }
                    }
                }
                out.extend_from_slice(&y);
            }
        }
        other => bail!("{} is not a dense type", other.name()),
    }
    ensure!(out.len() == n, "decoded {} of {n} elements", out.len());
    Ok(out)
}
