//! Malformed files: every way in gives an error that says what is wrong, never a panic or a large
//! allocation.

use super::write::GgufWriter;
use super::*;

/// A small valid file: two metadata keys, an array, an I2_S and an F32 tensor.
fn sample() -> Vec<u8> {
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::String("bitnet-b1.58".into()));
    w.meta(
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
    );
    let values: Vec<i8> = (0..256).map(|i| (i % 3) as i8 - 1).collect();
    w.tensor(
        "blk.0.attn_q.weight",
        vec![128, 2],
        GgmlType::I2S,
        quants::encode_i2s(&values, 0.5),
    );
    w.tensor("norm.weight", vec![4], GgmlType::F32, vec![0; 16]);
    w.to_bytes()
}

fn error(bytes: &[u8]) -> String {
    format!("{:#}", parse(bytes).expect_err("must be refused"))
}

/// Byte position just after the first occurrence of `needle`.
fn after(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
        + needle.len()
}

#[test]
fn the_sample_parses_and_decodes() {
    let bytes = sample();
    let h = parse(&bytes).unwrap();
    assert_eq!((h.version, h.alignment, h.tensors.len()), (3, 32, 2));
    let q = &h.tensors[0];
    let (values, scale) = quants::ternary_values(q.ggml_type, &bytes[q.data.clone()], 256).unwrap();
    assert_eq!(scale, 0.5);
    assert_eq!(values[..4], [-1, 0, 1, -1]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    for len in 0..bytes.len() {
        assert!(
            parse(&bytes[..len]).is_err(),
            "a file cut at {len} bytes parsed"
        );
    }
}

#[test]
fn lying_offsets_and_counts_are_refused() {
    let bytes = sample();
    // The I2_S tensor's offset field follows its type id (36) and is 0: make it point past the end.
    let name = b"blk.0.attn_q.weight";
    let offset_at = after(&bytes, name) + 4 + 2 * 8 + 4;
    let mut b = bytes.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(error(&b).contains("past the end"), "{}", error(&b));
    b[offset_at..offset_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    assert!(error(&b).contains("past the end"), "{}", error(&b));
    b[offset_at..offset_at + 8].copy_from_slice(&3u64.to_le_bytes());
    assert!(error(&b).contains("alignment"), "{}", error(&b));

    // Tensor and metadata counts (header bytes 8..16 and 16..24).
    for at in [8, 16] {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(error(&b).contains("cannot fit"), "{}", error(&b));
    }
    // The array count of tokenizer.ggml.tokens (after its u32 element type).
    let count_at = after(&bytes, b"tokenizer.ggml.tokens") + 4 + 4;
    let mut b = bytes.clone();
    b[count_at..count_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(error(&b).contains("cannot fit"), "{}", error(&b));
    // A string length.
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(error(&b).contains("truncated"), "{}", error(&b));
    // A shape whose element count overflows.
    let ne_at = after(&bytes, name) + 4;
    let mut b = bytes.clone();
    b[ne_at..ne_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[ne_at + 8..ne_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(error(&b).contains("overflows"), "{}", error(&b));
    // An element count that fits but a byte size that does not (found by the fuzzer).
    let f32_ne = GgmlType::F32.tensor_bytes(&[1 << 62, 2]);
    assert!(format!("{:#}", f32_ne.unwrap_err()).contains("overflows"));
}

#[test]
fn unknown_and_foreign_types_are_named() {
    let bytes = sample();
    let type_at = after(&bytes, b"blk.0.attn_q.weight") + 4 + 2 * 8;
    for (id, needle) in [
        (99u32, "unknown ggml type id 99"),
        (39, "TL2"),
        (38, "TL1"),
        (12, "Q4_K"),
    ] {
        let mut b = bytes.clone();
        b[type_at..type_at + 4].copy_from_slice(&id.to_le_bytes());
        assert!(error(&b).contains(needle), "{}", error(&b));
    }
    // Type 39 is MXFP4 outside bitnet.cpp's architectures.
    let mut b = bytes.clone();
    let arch_at = after(&bytes, b"bitnet-b1.58") - 12;
    b[arch_at..arch_at + 12].copy_from_slice(b"llama-b1.58_");
    b[type_at..type_at + 4].copy_from_slice(&39u32.to_le_bytes());
    assert!(error(&b).contains("MXFP4"), "{}", error(&b));
    // An unknown metadata value type (the first key's type follows its name).
    let mut b = bytes.clone();
    let value_type_at = after(&bytes, b"general.architecture");
    b[value_type_at..value_type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(error(&b).contains("unknown value type 77"), "{}", error(&b));
    // Not GGUF, or another version.
    assert!(error(b"GGML\x03\0\0\0").contains("magic"));
    let mut b = bytes.clone();
    b[4] = 9;
    assert!(error(&b).contains("version 9"), "{}", error(&b));
}

#[test]
fn arm_i2s_rows_and_invalid_codes_are_refused() {
    // A 64-element row is only possible in bitnet.cpp's ARM layout.
    let err = format!("{:#}", GgmlType::I2S.tensor_bytes(&[64, 4]).unwrap_err());
    assert!(err.contains("ARM"), "{err}");
    let mut data = quants::encode_i2s(&[0; 128], 1.0);
    data[5] = 0b11 << 6;
    let err = format!(
        "{:#}",
        quants::ternary_values(GgmlType::I2S, &data, 128).unwrap_err()
    );
    assert!(err.contains("code 3"), "{err}");
}

#[test]
fn tq_blocks_with_different_scales_are_not_one_ternary_matrix() {
    let values: Vec<i8> = (0..512).map(|i| (i % 3) as i8 - 1).collect();
    let mut data = quants::encode_tq2_0(&values, 0.25);
    assert_eq!(
        quants::ternary_values(GgmlType::Tq2_0, &data, 512).unwrap(),
        (values.clone(), 0.25)
    );
    let second_d = 66 + 64;
    data[second_d..second_d + 2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
    let err = format!(
        "{:#}",
        quants::ternary_values(GgmlType::Tq2_0, &data, 512).unwrap_err()
    );
    assert!(err.contains("per-block scales"), "{err}");
    let tq1 = quants::encode_tq1_0(&values, 0.25);
    assert_eq!(
        quants::ternary_values(GgmlType::Tq1_0, &tq1, 512).unwrap(),
        (values, 0.25)
    );
}

#[test]
fn dense_block_types_decode() {
    // Q8_0: d = 0.5, q = -3..29.
    let mut q8 = half::f16::from_f32(0.5).to_bits().to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 3) as u8));
    let got = quants::dense_values(GgmlType::Q8_0, &q8, 32).unwrap();
    assert_eq!(got[0], -1.5);
    assert_eq!(got[31], 14.0);
    // Q4_0: d = 2, low nibbles 0..16 then high nibbles 15..0, minus 8.
    let mut q4 = half::f16::from_f32(2.0).to_bits().to_le_bytes().to_vec();
    q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = quants::dense_values(GgmlType::Q4_0, &q4, 32).unwrap();
    assert_eq!(
        (got[0], got[15], got[16], got[31]),
        (-16.0, 14.0, 14.0, -16.0)
    );
    // Q6_K: every 6-bit value 33 (= +1), scale i of 16 elements = i + 1, d = 0.25.
    let mut q6 = vec![0u8; 210];
    q6[..128].fill(0x11); // low nibbles 1
    q6[128..192].fill(0b1010_1010); // high bits 2 → 2 << 4 | 1 = 33
    for (i, s) in q6[192..208].iter_mut().enumerate() {
        *s = i as u8 + 1;
    }
    q6[208..210].copy_from_slice(&half::f16::from_f32(0.25).to_bits().to_le_bytes());
    let got = quants::dense_values(GgmlType::Q6K, &q6, 256).unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.25 * (i / 16 + 1) as f32, "element {i}");
    }
}

#[test]
fn a_vocab_only_file_may_end_before_the_padding() {
    // Like llama.cpp's `ggml-vocab-*.gguf`: metadata only, the file ends right after it.
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Value::String("llama".into()));
    w.meta("tokenizer.ggml.model", Value::String("llama".into()));
    let bytes = w.to_bytes();
    assert_ne!(bytes.len() % 32, 0, "the sample must end off the alignment");
    let h = parse(&bytes).unwrap();
    assert!(h.tensors.is_empty());
    assert_eq!(h.metadata.len(), 2);
    for len in 0..bytes.len() {
        assert!(
            parse(&bytes[..len]).is_err(),
            "a file cut at {len} bytes parsed"
        );
    }
    // With the padding present, and with trailing bytes, it reads the same.
    let mut padded = bytes.clone();
    padded.resize(bytes.len().next_multiple_of(32) + 7, 0);
    assert!(parse(&padded).unwrap().tensors.is_empty());
}

#[test]
fn an_empty_data_section_holds_only_empty_tensors() {
    // A tensor with no elements fits an empty data section; one with bytes does not.
    let mut w = GgufWriter::default();
    w.tensor("empty", vec![0], GgmlType::F32, vec![]);
    let bytes = w.to_bytes();
    let h = parse(&bytes).unwrap();
    assert_eq!(h.tensors[0].data.len(), 0);
    let cut = after(&bytes, b"empty") + 4 + 8 + 4 + 8;
    let h = parse(&bytes[..cut]).unwrap();
    assert_eq!(h.tensors[0].data, cut..cut);

    let mut w = GgufWriter::default();
    w.tensor("full", vec![4], GgmlType::F32, vec![0; 16]);
    let bytes = w.to_bytes();
    let cut = after(&bytes, b"full") + 4 + 8 + 4 + 8;
    assert!(
        error(&bytes[..cut]).contains("past the end"),
        "{}",
        error(&bytes[..cut])
    );
}
