//! GGUF specifics beyond the golden model checks (which run on the GGUF fixtures in golden.rs): the
//! tokenizer built from metadata, what is inferred, and what is refused.

mod common;

use common::*;
use tern::chat::ChatMessage;
use tern::gguf::GgufFile;
use tern::gguf::model::tokenizer_from_metadata;
use tern::loader::load_model_files;
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
fn unsupported_tokenizers_are_refused_by_name() {
    let mut file = GgufFile::open(&fixture_dir(GGUF_FIXTURES[1])).unwrap();
    file.metadata.insert(
        "tokenizer.ggml.pre".into(),
        tern::gguf::Value::String("qwen2".into()),
    );
    let err = format!(
        "{:#}",
        tokenizer_from_metadata(&file, &mut vec![]).unwrap_err()
    );
    assert!(err.contains("qwen2"), "{err}");
    file.metadata.insert(
        "tokenizer.ggml.model".into(),
        tern::gguf::Value::String("llama".into()),
    );
    let err = format!(
        "{:#}",
        tokenizer_from_metadata(&file, &mut vec![]).unwrap_err()
    );
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
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
            tern_cpu::float::GateActivation::Relu2
        );
    }
}
