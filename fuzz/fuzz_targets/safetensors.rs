//! Any bytes as `model.safetensors` beside tiny-packed's config.json give a model or an error: no
//! panic, no out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;

const CONFIG: &str = include_str!("../../tests/fixtures/tiny-packed/config.json");

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let written = std::fs::write(dir.path().join("config.json"), CONFIG)
        .and_then(|()| std::fs::write(dir.path().join("model.safetensors"), data));
    if written.is_ok() {
        let _ = tern_load::loader::load_hf_dir(dir.path());
    }
});
