//! GGUF specifics beyond the golden model checks (which run on the GGUF fixtures in golden.rs): the
//! tokenizer built from metadata, what is inferred, and what is refused.

mod common;

use common::*;
use tern::chat::ChatMessage;
use tern::gguf::vocab::tokenizer_from_metadata;
use tern::gguf::write::{TernaryTarget, VocabSource, model_to_gguf};
use tern::gguf::{GgmlType, GgufFile};
use tern::loader::load_model_files;
use tern::model::LogitsFor;
use tern::tokenizer::Tokenizer;

fn tokenizer_of(file: &GgufFile) -> (Tokenizer, Vec<String>) {
    let mut notes = Vec::new();
    let t = tokenizer_from_metadata(file, &mut notes).unwrap();
    (t, notes)
}

fn check_golden_tokenization(name: &str, tok: &Tokenizer) {
    let g = golden("tiny-packed");
    let cases = g["tokenization"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let with = ids(&case["ids_with_special_tokens"]);
        let without = ids(&case["ids_without_special_tokens"]);
        assert_eq!(tok.encode(text, true).unwrap(), with, "{name} case {i}");
        assert_eq!(tok.encode(text, false).unwrap(), without, "{name} case {i}");
        let pieces: Vec<serde_json::Value> = without
            .iter()
            .map(|&id| tok.id_to_piece(id).unwrap().into())
            .collect();
        assert_eq!(
            pieces,
            case["tokens_without_special_tokens"].as_array().unwrap()[..],
            "{name} case {i}"
        );
        assert_eq!(
            tok.decode(&without, false).unwrap(),
            case["decoded_without_special_tokens"].as_str().unwrap(),
            "{name} case {i}"
        );
        assert_eq!(
            tok.decode(&with, true).unwrap(),
            case["decoded_with_special_tokens_skipped"]
                .as_str()
                .unwrap(),
            "{name} case {i}"
        );
    }
    let chat = &cases[4];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["chat_messages"].clone()).unwrap();
    let rendered = tok
        .chat_template()
        .expect("tokenizer.chat_template")
        .render(&messages, chat["add_generation_prompt"].as_bool().unwrap())
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap(), "{name}");

    let text = std::fs::read_to_string(fixture_dir("ppl.txt")).unwrap();
    assert_eq!(
        tok.encode(&text, true).unwrap().len(),
        1427,
        "{name}: ppl.txt"
    );
    assert_eq!(tok.bos_id(), Some(1008));
    let mut eos = tok.eos_ids().to_vec();
    eos.sort_unstable();
    assert_eq!(eos, [1009, 1017], "{name}: <|end_of_text|> and <|eot_id|>");
}

#[test]
fn tokenizer_from_metadata_reproduces_the_golden_cases() {
    for name in GGUF_FIXTURES {
        let file = GgufFile::open(&fixture_dir(name)).unwrap();
        let (tok, notes) = tokenizer_of(&file);
        assert!(notes.is_empty(), "{name}: {notes:?}");
        check_golden_tokenization(name, &tok);
    }
}

#[test]
fn a_missing_pre_tokenizer_uses_llama3_and_says_so() {
    let mut file = GgufFile::open(&fixture_dir(GGUF_FIXTURES[0])).unwrap();
    file.metadata.remove("tokenizer.ggml.pre");
    let (tok, notes) = tokenizer_of(&file);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("tokenizer.ggml.pre"), "{notes:?}");
    check_golden_tokenization("without tokenizer.ggml.pre", &tok);
}

#[test]
fn bos_and_eos_follow_the_metadata_and_llama_cpp_defaults() {
    use tern::gguf::Value;
    let mut file = GgufFile::open(&fixture_dir(GGUF_FIXTURES[1])).unwrap();
    let hello = [39, 68, 358, 78];
    let encode = |file: &GgufFile| {
        let (tok, _) = tokenizer_of(file);
        (tok.encode("Hello", true).unwrap(), tok.adds_bos())
    };
    file.metadata
        .insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
    assert_eq!(
        encode(&file),
        ([&[1008][..], &hello, &[1017]].concat(), true)
    );
    file.metadata
        .insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    assert_eq!(encode(&file), ([&hello[..], &[1017]].concat(), false));
    // Absent keys: no EOS, and BOS for Llama-3's family only (a GPT-2 split on the same vocabulary
    // encodes "Hello" the same way).
    file.metadata.remove("tokenizer.ggml.add_eos_token");
    file.metadata.remove("tokenizer.ggml.add_bos_token");
    assert_eq!(encode(&file), ([&[1008][..], &hello].concat(), true));
    let gpt2 = Value::String("gpt-2".into());
    file.metadata.insert("tokenizer.ggml.pre".into(), gpt2);
    assert_eq!(encode(&file), (hello.to_vec(), false));
    // An id outside the vocabulary is ignored with a note, as llama.cpp does.
    file.metadata
        .insert("tokenizer.ggml.bos_token_id".into(), Value::U32(5000));
    let (tok, notes) = tokenizer_of(&file);
    assert_eq!(tok.bos_id(), None);
    assert!(notes.iter().any(|n| n.contains("5000")), "{notes:?}");
}

/// The tokenizer of a file holding just `metadata`, or its error.
fn tokenizer_of_metadata(metadata: Vec<(&str, tern::gguf::Value)>) -> Result<Tokenizer, String> {
    let mut w = tern::gguf::write::GgufWriter::default();
    for (key, value) in metadata {
        w.meta(key, value);
    }
    let f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    w.write(f.path()).unwrap();
    let file = GgufFile::open(f.path()).unwrap();
    tokenizer_from_metadata(&file, &mut vec![]).map_err(|e| format!("{e:#}"))
}

#[test]
fn odd_vocabularies_give_a_tokenizer_or_an_error_naming_the_key() {
    use tern::gguf::Value;
    let strings =
        |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let model = |m: &str| ("tokenizer.ggml.model", Value::String(m.into()));
    // SentencePiece with one token: llama.cpp's default BOS (1) and EOS (2) do not exist.
    let tok = tokenizer_of_metadata(vec![
        model("llama"),
        ("tokenizer.ggml.tokens", strings(&["▁a"])),
    ])
    .unwrap();
    assert_eq!((tok.bos_id(), tok.eos_ids()), (None, &[][..]));
    assert!(!tok.adds_bos());
    // i32 scores (llama.cpp reads them too), negative ones included.
    let tokens = strings(&["<unk>", "▁", "a", "▁a"]);
    let scores = Value::Array(vec![
        Value::I32(0),
        Value::I32(-1),
        Value::I32(-2),
        Value::I32(-3),
    ]);
    let tok = tokenizer_of_metadata(vec![
        model("llama"),
        ("tokenizer.ggml.tokens", tokens.clone()),
        ("tokenizer.ggml.scores", scores),
    ])
    .unwrap();
    assert_eq!(tok.encode("a a", false).unwrap(), [3, 3]);
    for (metadata, needle) in [
        (
            vec![model("gpt2"), ("tokenizer.ggml.tokens", tokens.clone())],
            "`tokenizer.ggml.merges`",
        ),
        (
            vec![model("llama"), ("tokenizer.ggml.tokens", Value::U32(3))],
            "`tokenizer.ggml.tokens`",
        ),
        (
            vec![("tokenizer.ggml.tokens", tokens.clone())],
            "`tokenizer.ggml.model` is missing",
        ),
        (
            vec![
                model("llama"),
                ("tokenizer.ggml.tokens", tokens.clone()),
                ("tokenizer.ggml.scores", Value::F32(1.0)),
            ],
            "`tokenizer.ggml.scores`",
        ),
        (
            vec![
                model("gpt2"),
                ("tokenizer.ggml.tokens", tokens),
                ("tokenizer.ggml.merges", strings(&["▁a"])),
            ],
            "not two tokens",
        ),
    ] {
        let err = tokenizer_of_metadata(metadata).unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn unsupported_tokenizers_are_refused_by_name() {
    let mut file = GgufFile::open(&fixture_dir(GGUF_FIXTURES[1])).unwrap();
    file.metadata.insert(
        "tokenizer.ggml.pre".into(),
        tern::gguf::Value::String("qwen9".into()),
    );
    let err = format!(
        "{:#}",
        tokenizer_from_metadata(&file, &mut vec![]).unwrap_err()
    );
    assert!(
        err.contains("\"qwen9\"") && err.contains("tokenizer.json"),
        "{err}"
    );
    file.metadata.insert(
        "tokenizer.ggml.model".into(),
        tern::gguf::Value::String("t5".into()),
    );
    let err = format!(
        "{:#}",
        tokenizer_from_metadata(&file, &mut vec![]).unwrap_err()
    );
    assert!(
        err.contains("`tokenizer.ggml.model` \"t5\"") && err.contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_json_beside_the_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    std::fs::copy(fixture_dir(GGUF_FIXTURES[2]), &gguf).unwrap();
    let (host, _) = load_model_files(&gguf).unwrap();
    assert!(!host.format.contains("inferred"), "{}", host.format);
    std::fs::copy(
        fixture_dir("tiny-packed/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let (host, tok) = load_model_files(&gguf).unwrap();
    assert!(host.format.contains("tokenizer.json"), "{}", host.format);
    assert!(
        tok.chat_template().is_none(),
        "the template came from the directory"
    );
}

#[test]
fn formats_and_architectures_are_reported() {
    for (name, arch, ternary) in [
        (GGUF_FIXTURES[0], "bitnet-b1.58", "I2_S ×14"),
        (GGUF_FIXTURES[1], "bitnet", "TQ2_0 ×14"),
        (GGUF_FIXTURES[2], "bitnet", "TQ1_0 ×14"),
    ] {
        let host = load(name);
        assert!(
            host.format.contains(&format!("architecture {arch},")),
            "{}",
            host.format
        );
        assert!(host.format.contains(ternary), "{}", host.format);
        assert!(host.format.contains("F16 ×1"), "{}", host.format);
        assert!(host.output.is_none(), "tied head");
        assert_eq!(
            host.config.activation,
            tern_cpu::elementwise::GateActivation::Relu2
        );
    }
}

/// Converts `model` (a fixture name) to `target` in memory and parses the result.
fn convert(model: &str, target: TernaryTarget) -> (tempfile::NamedTempFile, GgufFile) {
    let (host, tokenizer) = load_model_files(&fixture_dir(model)).unwrap();
    let (bytes, _notes) = model_to_gguf(
        &host,
        VocabSource::Tokenizer(&tokenizer),
        target,
        "converted",
    )
    .unwrap();
    let out = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::fs::write(out.path(), bytes).unwrap();
    let file = GgufFile::open(out.path()).unwrap();
    (out, file)
}

/// The bytes of a tensor that are defined: all of them, except I2_S's tail after the scale.
fn defined_bytes<'a>(file: &'a GgufFile, t: &tern::gguf::TensorInfo) -> &'a [u8] {
    let data = file.data(t);
    match t.ggml_type {
        GgmlType::I2S => &data[..data.len() - 28],
        _ => data,
    }
}

fn len7_logits(path: &std::path::Path) -> Vec<f32> {
    let (host, _) = load_model_files(path).unwrap();
    let g = golden("tiny-packed");
    let tokens = ids(&g["logits"][1]["input_ids"]);
    let mut e = engine(&host, backends().remove(0).1, 0);
    let seq = e.new_sequence().unwrap();
    e.feed(seq, &tokens, LogitsFor::All).unwrap()
}

#[test]
fn converted_files_match_the_reference_files_tensor_for_tensor() {
    for (target, reference) in [
        (TernaryTarget::I2S, GGUF_FIXTURES[0]),
        (TernaryTarget::Tq2_0, GGUF_FIXTURES[1]),
        (TernaryTarget::Tq1_0, GGUF_FIXTURES[2]),
    ] {
        let want = GgufFile::open(&fixture_dir(reference)).unwrap();
        // From the Hugging Face directory, and from another GGUF format.
        let other_gguf = GGUF_FIXTURES[(target as usize + 1) % 3];
        for source in ["tiny-packed", other_gguf] {
            let (path, got) = convert(source, target);
            assert_eq!(
                got.tensors.len(),
                want.tensors.len(),
                "{source} → {reference}"
            );
            for t in &want.tensors {
                let mine = got.tensor(&t.name).unwrap();
                assert_eq!(
                    (mine.ggml_type, &mine.ne),
                    (t.ggml_type, &t.ne),
                    "{}",
                    t.name
                );
                assert_eq!(
                    defined_bytes(&got, mine),
                    defined_bytes(&want, t),
                    "{source} → {reference}: tensor {}",
                    t.name
                );
                if t.ggml_type == GgmlType::I2S {
                    let data = got.data(mine);
                    assert!(data[data.len() - 28..].iter().all(|&b| b == 0), "zero tail");
                }
            }
            for (key, value) in &got.metadata {
                if let Some(reference_value) = want.get(key)
                    && key != "general.name"
                {
                    assert_eq!(value, reference_value, "{source} → {reference}: `{key}`");
                }
            }
            assert_eq!(
                len7_logits(path.path()),
                len7_logits(&fixture_dir(reference)),
                "{source} → {reference}: identical logits"
            );
        }
    }
}

#[test]
fn a_llama_bitlinear_model_round_trips_with_permuted_qk() {
    let (path, file) = convert("tiny-bitlinear", TernaryTarget::I2S);
    assert_eq!(
        file.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    let direct = load("tiny-bitlinear");
    let (round_trip, _) = load_model_files(path.path()).unwrap();
    assert!(round_trip.output.is_some() && !round_trip.config.sub_norms);
    for (a, b) in round_trip.layers.iter().zip(&direct.layers) {
        assert_eq!(a.q, b.q, "Q rows permuted back");
        assert_eq!(a.k, b.k, "K rows permuted back");
        assert_eq!(a.down, b.down);
    }
    // The stored Q rows are in llama.cpp's interleaved order, not the Hugging Face one.
    let q = file.tensor("blk.0.attn_q.weight").unwrap();
    let (stored, _) =
        tern::gguf::quants::ternary_values(q.ggml_type, file.data(q), 256 * 256).unwrap();
    assert_ne!(stored, direct.layers[0].q.to_i8());
}

/// A copy of a GGUF fixture with every occurrence of `from` replaced by `to` (same length).
fn patched(name: &str, from: &str, to: &str) -> tempfile::NamedTempFile {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(fixture_dir(name)).unwrap();
    let mut found = false;
    for at in 0..bytes.len() - from.len() {
        if &bytes[at..at + from.len()] == from.as_bytes() {
            bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
            found = true;
        }
    }
    assert!(found, "{from} not in {name}");
    let out = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::fs::write(out.path(), bytes).unwrap();
    out
}

fn load_error(file: &tempfile::NamedTempFile) -> String {
    format!("{:#}", load_model_files(file.path()).unwrap_err())
}

#[test]
fn missing_tensors_and_unknown_architectures_are_named() {
    let f = patched(
        GGUF_FIXTURES[0],
        "blk.1.ffn_down.weight",
        "blk.1.ffn_dowX.weight",
    );
    let err = load_error(&f);
    assert!(
        err.contains("tensor `blk.1.ffn_down.weight` is missing"),
        "{err}"
    );
    let f = patched(
        GGUF_FIXTURES[1],
        "general.architecture\x08\0\0\0\x06\0\0\0\0\0\0\0bitnet",
        "general.architecture\x08\0\0\0\x06\0\0\0\0\0\0\0mamba2",
    );
    let err = load_error(&f);
    assert!(
        err.contains("architecture `mamba2` is not supported"),
        "{err}"
    );
}

#[test]
fn a_bitnet_file_without_its_activation_key_says_what_was_inferred() {
    let f = patched(
        GGUF_FIXTURES[1],
        "bitnet.hidden_activation",
        "bitnet.hidden_activatioX",
    );
    let (host, _) = load_model_files(f.path()).unwrap();
    assert_eq!(
        host.config.activation,
        tern_cpu::elementwise::GateActivation::Relu2
    );
    assert!(
        host.format.contains("inferred: FFN activation ReLU²"),
        "{}",
        host.format
    );
}

/// llama.cpp's tokenizer test vocabularies checked (`models/ggml-vocab-NAME.gguf`), by name.
const LLAMA_CPP_VOCABS: [&str; 13] = [
    "llama-spm",
    "phi-3",
    "llama-bpe",
    "falcon",
    "gpt-2",
    "qwen2",
    "qwen35",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
];

/// The folder holding llama.cpp's `models/ggml-vocab-*` files (`TERN_VOCAB_DIR`; .ci/run fetches
/// them from the llama-cpp-python sdist). Absent: `None` with a printed reason, or a failure under
/// `TERN_REQUIRE_VOCAB=1`.
fn llama_cpp_vocab_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("TERN_VOCAB_DIR").map(std::path::PathBuf::from);
    let required = std::env::var("TERN_REQUIRE_VOCAB").is_ok_and(|v| v == "1");
    match dir.filter(|d| d.join("ggml-vocab-llama-spm.gguf").is_file()) {
        Some(dir) => Some(dir),
        None if required => panic!(
            "TERN_REQUIRE_VOCAB=1 but TERN_VOCAB_DIR does not hold llama.cpp's ggml-vocab-*.gguf files"
        ),
        None => {
            eprintln!(
                "skipping a test on llama.cpp's test vocabularies: set TERN_VOCAB_DIR to llama.cpp's \
                 models/ folder (.ci/run fetches it)"
            );
            None
        }
    }
}

/// llama.cpp's test cases of a vocabulary: `.inp` texts separated by `\n__ggml_vocab_test__\n`,
/// `.out` one line of ids per text (as test-tokenizer-0 reads them).
fn llama_cpp_cases(dir: &std::path::Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir.join(format!("ggml-vocab-{name}.gguf"));
    let read = |ext: &str| std::fs::read_to_string(base.with_extension(format!("gguf.{ext}")));
    let (inp, out) = (read("inp").unwrap(), read("out").unwrap());
    let sep = "\n__ggml_vocab_test__\n";
    let texts: Vec<&str> = inp.strip_suffix(sep).unwrap_or(&inp).split(sep).collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: .inp and .out disagree");
    texts.iter().map(|t| t.to_string()).zip(ids).collect()
}

/// The tokenizer llama.cpp's vocabulary file `name` describes.
fn llama_cpp_tokenizer(dir: &std::path::Path, name: &str) -> Tokenizer {
    let file = GgufFile::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    let mut notes = Vec::new();
    let tok =
        tokenizer_from_metadata(&file, &mut notes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(notes.is_empty(), "{name}: {notes:?}");
    tok
}

/// Every case of llama.cpp's vocabulary `name` encodes to llama.cpp's ids and decodes back.
fn check_llama_cpp_cases(dir: &std::path::Path, name: &str, tok: &Tokenizer) {
    let cases = llama_cpp_cases(dir, name);
    assert!(cases.len() > 40, "{name}: {} cases", cases.len());
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(&got, want, "{name}: {text:?}");
        // llama.cpp's decoding gives every text back, except where most byte-level
        // vocabularies drop spaces (` ,`, ` 's`, ...); without that clean-up, tern's always does.
        let decoded = tok.decode(&got, false).unwrap();
        assert_eq!(&decoded, text, "{name}: decoding {got:?}");
    }
}

#[test]
fn llama_cpp_tokenizer_test_vectors() {
    let Some(dir) = llama_cpp_vocab_dir() else {
        return;
    };
    for name in LLAMA_CPP_VOCABS {
        check_llama_cpp_cases(&dir, name, &llama_cpp_tokenizer(&dir, name));
    }
    // Falcon3's `pre` names Llama-3's rules.
    let mut file = GgufFile::open(&dir.join("ggml-vocab-llama-bpe.gguf")).unwrap();
    let pre = tern::gguf::Value::String("falcon3".into());
    file.metadata.insert("tokenizer.ggml.pre".into(), pre);
    let tok = tokenizer_from_metadata(&file, &mut vec![]).unwrap();
    check_llama_cpp_cases(&dir, "llama-bpe", &tok);
}

/// `host` with `vocab` embedding (and head) rows, the new ones repeating the old, so that a real
/// vocabulary's ids fit.
fn grow_vocab(mut host: tern::loader::HostModel, vocab: usize) -> tern::loader::HostModel {
    use tern::ternary::{DenseData, DenseMatrix};
    use tern_cpu::table::DenseView;
    fn tile<T: Copy>(v: &[T], cols: usize, rows: usize) -> Vec<T> {
        v.chunks_exact(cols)
            .cycle()
            .take(rows)
            .flatten()
            .copied()
            .collect()
    }
    fn grow(m: &DenseMatrix, rows: usize) -> DenseMatrix {
        let data = match m.view() {
            DenseView::F32(v) => DenseData::F32(tile(v, m.cols, rows)),
            DenseView::F16(v) => DenseData::F16(tile(v, m.cols, rows)),
            DenseView::Bf16(v) => DenseData::Bf16(tile(v, m.cols, rows)),
        };
        DenseMatrix {
            rows,
            cols: m.cols,
            data,
        }
    }
    host.embed = grow(&host.embed, vocab);
    host.output = host.output.as_ref().map(|m| grow(m, vocab));
    host.config.vocab = vocab;
    host
}

/// Greedy continuation of `prompt` by `n` tokens on the CPU.
fn greedy(host: &tern::loader::HostModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let cpu = tern::backend::cpu::CpuBackend::new(1).unwrap();
    let mut e = engine(host, Box::new(cpu), 64);
    let seq = e.new_sequence().unwrap();
    let mut logits = e.feed(seq, prompt, LogitsFor::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits) as u32;
        out.push(next);
        logits = e.feed(seq, &[next], LogitsFor::Last).unwrap();
    }
    out
}

#[test]
fn one_bit_llm_and_falcon3_style_files_run_with_the_tokenizer_of_their_metadata() {
    let Some(vocab_dir) = llama_cpp_vocab_dir() else {
        return;
    };
    // 1bitLLM (bitnet.cpp's layout): `bitnet` with sub-norms and SiLU but no
    // `bitnet.hidden_activation`, the Llama SentencePiece vocabulary. Falcon3-1.58bit: `llama`
    // with ternary linears and a byte-level BPE vocabulary (llama.cpp's Falcon test vocabulary,
    // whose `pre` its test cases are for).
    for (fixture, vocab_name, activation_key) in [
        ("tiny-packed", "llama-spm", Some("bitnet.hidden_activation")),
        ("tiny-bitlinear", "falcon", None),
    ] {
        let vocab =
            GgufFile::open(&vocab_dir.join(format!("ggml-vocab-{vocab_name}.gguf"))).unwrap();
        let n_vocab = vocab
            .get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len();
        let mut host = grow_vocab(load(fixture), n_vocab);
        if activation_key.is_some() {
            host.config.activation = tern_cpu::elementwise::GateActivation::Silu;
        }
        let (mut bytes, _notes) = model_to_gguf(
            &host,
            VocabSource::Metadata(&vocab.metadata),
            TernaryTarget::I2S,
            vocab_name,
        )
        .unwrap();
        if let Some(key) = activation_key {
            let at = bytes
                .windows(key.len())
                .position(|w| w == key.as_bytes())
                .unwrap();
            bytes[at + key.len() - 1] = b'X';
        }
        // A folder of its own: nothing but the GGUF file describes the tokenizer.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();

        let (loaded, tok) = load_model_files(&path).unwrap();
        check_llama_cpp_cases(&vocab_dir, vocab_name, &tok);
        assert_eq!(
            loaded.config.activation,
            tern_cpu::elementwise::GateActivation::Silu
        );
        if activation_key.is_some() {
            assert!(loaded.format.contains("SentencePiece"), "{}", loaded.format);
        }
        let prompt = tok.encode("Hello world", true).unwrap();
        assert_eq!(
            prompt.first() == tok.bos_id().as_ref(),
            vocab_name == "llama-spm"
        );
        let new = greedy(&loaded, &prompt, 8);
        assert_eq!(
            new,
            greedy(&host, &prompt, 8),
            "{vocab_name}: same tokens as before writing"
        );
        assert!(new.iter().all(|&id| (id as usize) < n_vocab));
        let mut stream = tok.stream_decoder(true);
        let streamed: String = new.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(
            streamed + &stream.finish().unwrap(),
            tok.decode(&new, true).unwrap()
        );
    }
}

/// `tern convert --shape`'s path: random weights streamed to a GGUF file with a dummy vocabulary
/// load back (tokenizer included) as the very weights the random source generates.
#[test]
fn random_shapes_written_as_gguf_load_back_as_the_same_weights() {
    use tern::bench::{RandomSource, ShapePreset};
    use tern::gguf::write::write_model_gguf_file;
    use tern::loader::ModelSource;
    let config = ShapePreset {
        hidden: 256,
        intermediate: 512,
        layers: 3,
        heads: 4,
        kv_heads: 4,
        vocab: 300,
        ..ShapePreset::parse("7b").unwrap()
    }
    .config();
    let source = RandomSource::new(config.clone(), 11);
    let dir = tempfile::tempdir().unwrap();
    for target in [TernaryTarget::I2S, TernaryTarget::Tq2_0] {
        let path = dir.path().join(format!("{target:?}.gguf"));
        write_model_gguf_file(&source, VocabSource::Dummy, target, "random", &path).unwrap();
        let (loaded, tokenizer) = load_model_files(&path).unwrap();
        assert_eq!(tokenizer.vocab_size(), 300, "{target:?}");
        assert_eq!(tokenizer.bos_id(), Some(298), "{target:?}");
        assert!(
            !tokenizer
                .encode("ternary weights", false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(loaded.config.layers, 3);
        for l in 0..config.layers {
            let want = source.layer(l).unwrap();
            for (i, (got, want)) in loaded.layers[l]
                .linears()
                .iter()
                .zip(want.linears())
                .enumerate()
            {
                assert!(
                    got.codes == want.codes,
                    "{target:?} layer {l} linear {i}: codes differ"
                );
                // TQ2_0 stores the scale as its f16 block scale.
                let scale = match target {
                    TernaryTarget::I2S => want.scale,
                    _ => half::f16::from_f32(want.scale).to_f32(),
                };
                assert_eq!(got.scale, scale, "{target:?} layer {l} linear {i}");
            }
        }
        // bf16 tables are written as f16, exactly for values in ±0.05 above f16's normal range.
        let (got, want) = (loaded.embed.view(), source.embed().unwrap());
        let want = want.view();
        let mut row = (vec![0f32; 256], vec![0f32; 256]);
        for r in [0, 150, 299] {
            got.row_to_f32(r, 256, &mut row.0).unwrap();
            want.row_to_f32(r, 256, &mut row.1).unwrap();
            let rounded: Vec<f32> = row
                .1
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            assert_eq!(row.0, rounded, "{target:?} embedding row {r}");
        }
    }
}
