//! Any bytes given to the GGUF reader, the tensor decoders and the model loader give a value or an
//! error: no panic, no out-of-bounds read, no allocation the input does not pay for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_load::gguf::{parse, quants};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse(data) else { return };
    for t in &header.tensors {
        let bytes = &data[t.data.clone()];
        let n = t.ne.iter().product::<u64>() as usize;
        let _ = if t.ggml_type.is_ternary() {
            quants::ternary_values(t.ggml_type, bytes, n).map(drop)
        } else {
            quants::dense_values(t.ggml_type, bytes, n).map(drop)
        };
    }
    // The whole model path (metadata to HostModel, tokenizer) on the same bytes.
    let Ok(file) = tempfile::Builder::new().suffix(".gguf").tempfile() else {
        return;
    };
    if std::fs::write(file.path(), data).is_ok() {
        let _ = tern_load::loader::load_model_files(file.path());
    }
});
