//! The `tern` binary end to end on the fixtures: every subcommand, the golden checks that can be seen
//! from outside (tokens, greedy ids, perplexity), and bad input, which must give a clear error, a
//! non-zero exit status and never a panic.

mod common;

use common::*;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tern(args: &[&str]) -> Output {
    tern_logging(args, "warn")
}

/// `tern args` with the log level `level` on stderr.
fn tern_logging(args: &[&str], level: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TERN_LOG", level)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = tern(args);
    assert!(o.status.success(), "tern {args:?} failed:\n{}", stderr(&o));
    stdout(&o)
}

/// Runs `tern args`, expects failure with exit status 1 and an error mentioning every needle.
fn fails_with(args: &[&str], needles: &[&str]) {
    let o = tern(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "tern {args:?} should fail with 1:\n{err}"
    );
    assert!(!err.contains("panicked"), "tern {args:?} panicked:\n{err}");
    assert!(err.contains("error:"), "no error line:\n{err}");
    for n in needles {
        assert!(
            err.contains(n),
            "tern {args:?}: error should mention `{n}`:\n{err}"
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn jsonl_ids(out: &str) -> Vec<u32> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("id").and_then(|i| i.as_u64()).map(|i| i as u32))
        .collect()
}

#[test]
fn run_greedy_reproduces_the_golden_prefix_as_text_and_jsonl() {
    for name in all_fixtures() {
        let g = golden(name);
        let dir = fixture_dir(name);
        for case in g["greedy"]["cases"].as_array().unwrap() {
            let new = ids(&case["new_ids"]);
            let robust = case["robust_prefix_len"].as_u64().unwrap() as usize;
            let mut args = vec![
                "run",
                "-m",
                path_str(&dir),
                "--backend",
                "cpu",
                "-n",
                "16",
                "--greedy",
            ];
            let (mut system, mut user) = (None, String::new());
            match case.get("prompt_messages").and_then(|m| m.as_array()) {
                Some(messages) => {
                    for m in messages {
                        let content = m["content"].as_str().unwrap().to_string();
                        match m["role"].as_str().unwrap() {
                            "system" => system = Some(content),
                            _ => user = content,
                        }
                    }
                    args.push("--chat");
                }
                None => user = case["prompt_text"].as_str().unwrap().to_string(),
            }
            if let Some(system) = &system {
                args.extend(["--system", system]);
            }
            args.extend(["-p", &user]);
            let mut jsonl = args.clone();
            jsonl.extend(["--format", "jsonl", "--logprobs", "3"]);
            let out = ok(&jsonl);
            let got = jsonl_ids(&out);
            assert_eq!(got[..robust], new[..robust], "{name}");
            // Text pieces concatenate to the decoded text; each line carries its alternatives.
            let lines: Vec<serde_json::Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let joined: String = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
            assert_eq!(lines[0]["top_logprobs"].as_array().unwrap().len(), 3);
            assert!(lines[0]["logprob"].as_f64().unwrap() <= 0.0);
            let text = ok(&args);
            assert_eq!(
                text.trim_end_matches('\n'),
                joined,
                "{name}: text and jsonl agree"
            );
            // `--lm-head auto` took the 8-bit head for the greedy text (same tokens as the full
            // head, checked above) but not for log-probabilities, which need every logit.
            let head_log = "output head: 8-bit copy";
            assert!(stderr(&tern_logging(&args, "info")).contains(head_log));
            assert!(!stderr(&tern_logging(&jsonl, "info")).contains(head_log));
        }
    }
}

#[test]
fn tokenize_matches_the_golden_ids() {
    let g = golden("tiny-packed");
    let dir = fixture_dir("tiny-packed");
    for case in g["tokenization"].as_array().unwrap().iter().take(4) {
        let text = case["text"].as_str().unwrap();
        let out = ok(&[
            "tokenize",
            "-m",
            path_str(&dir),
            "-p",
            text,
            "--format",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&case["ids_with_special_tokens"]));
        let out = ok(&[
            "tokenize",
            "-m",
            path_str(&dir),
            "-p",
            text,
            "--no-special",
            "--format",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&case["ids_without_special_tokens"]));
        assert_eq!(v["tokens"], case["tokens_without_special_tokens"]);
    }
}

#[test]
fn perplexity_command_matches_the_golden_value() {
    let ppl_file = fixture_dir("ppl.txt");
    for name in all_fixtures() {
        let dir = fixture_dir(name);
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(golden_dir(name).join("perplexity.json")).unwrap(),
        )
        .unwrap();
        let want = golden["results"][1]["ppl"].as_f64().unwrap(); // ctx 128
        let out = ok(&[
            "perplexity",
            "-m",
            path_str(&dir),
            "-f",
            path_str(&ppl_file),
            "--ctx",
            "128",
            "--format",
            "json",
            "--backend",
            "cpu",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let got = v["ppl"].as_f64().unwrap();
        assert!(
            (got - want).abs() / want <= 0.005,
            "{name}: {got} vs {want}"
        );
        assert_eq!(v["tokens"], golden["n_tokens"]);
        assert!(v["mean_nll"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn info_and_bench_report_the_model() {
    let dir = fixture_dir("tiny-packed");
    let out = ok(&["info", "-m", path_str(&dir), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"], 2);
    assert_eq!(v["kv_heads"], 2);
    assert_eq!(
        v["parameters"]["ternary"],
        2 * (256 * 256 * 2 + 128 * 256 * 2 + 512 * 256 * 3)
    );
    assert_eq!(v["tokenizer"]["eos_ids"], serde_json::json!([1009, 1017]));
    assert!(ok(&["info", "-m", path_str(&dir)]).contains("architecture: BitNetForCausalLM"));

    let out = ok(&[
        "bench",
        "-m",
        path_str(&dir),
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "-t",
        "1,2",
        "--backend",
        "cpu",
        "--format",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let tests: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r["test"].as_str().unwrap(), r["threads"].as_u64().unwrap()))
        .collect();
    assert_eq!(tests, [("pp16", 1), ("tg4", 1), ("pp16", 2), ("tg4", 2)]);
    assert!(rows.iter().all(|r| r["tok_s"].as_f64().unwrap() > 0.0));
    let md = ok(&[
        "bench",
        "-m",
        path_str(&dir),
        "-p",
        "8",
        "-n",
        "0",
        "-r",
        "1",
        "--backend",
        "cpu",
    ]);
    assert!(md.contains("| pp8 |"), "{md}");
}

/// A copy of a fixture directory in a temporary place, to be damaged by a test.
struct Scratch {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn scratch_copy(name: &str) -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::create_dir(&path).unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
    }
    Scratch { _dir: dir, path }
}

/// Rewrites the copy's model.safetensors through `edit(name, dtype, shape, data)`, which returns the
/// tensor to write instead (or `None` to drop it).
fn rewrite_tensors(
    dir: &Path,
    edit: impl Fn(
        &str,
        safetensors::Dtype,
        Vec<usize>,
        Vec<u8>,
    ) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .filter_map(|(n, t)| {
            edit(n, t.dtype(), t.shape().to_vec(), t.data().to_vec())
                .map(|(d, s, b)| (n.to_string(), d, s, b))
        })
        .collect();
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
}

fn run_on(dir: &Path) -> Vec<String> {
    [
        "run",
        "-m",
        path_str(dir),
        "-p",
        "hi",
        "-n",
        "2",
        "--backend",
        "cpu",
    ]
    .map(String::from)
    .to_vec()
}

fn fails_on(dir: &Path, needles: &[&str]) {
    let args = run_on(dir);
    fails_with(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        needles,
    );
}

#[test]
fn damaged_weight_files_are_named_in_clear_errors() {
    let s = scratch_copy("tiny-packed");
    let file = s.path.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();

    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    fails_on(&s.path, &["model.safetensors", "truncated or corrupt"]);
    std::fs::write(&file, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    fails_on(
        &s.path,
        &["model.safetensors", "not a valid safetensors file"],
    );
    std::fs::remove_file(&file).unwrap();
    fails_on(
        &s.path,
        &["neither model.safetensors nor model.safetensors.index.json"],
    );

    let missing = "model.layers.1.mlp.up_proj.weight";
    std::fs::write(&file, &bytes).unwrap();
    rewrite_tensors(&s.path, |n, d, s, b| (n != missing).then_some((d, s, b)));
    fails_on(&s.path, &[missing, "missing"]);

    std::fs::write(&file, &bytes).unwrap();
    rewrite_tensors(&s.path, |n, d, mut s, mut b| {
        if n == "model.layers.0.self_attn.q_proj.weight" {
            s[1] -= 1;
            b.truncate(s[0] * s[1]);
        }
        Some((d, s, b))
    });
    fails_on(
        &s.path,
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "shape [64, 255]",
            "expected [64, 256]",
        ],
    );

    std::fs::write(&file, &bytes).unwrap();
    rewrite_tensors(&s.path, |n, d, s, b| {
        if n == "model.layers.0.mlp.down_proj.weight" {
            Some((safetensors::Dtype::I8, s, b))
        } else {
            Some((d, s, b))
        }
    });
    fails_on(
        &s.path,
        &["model.layers.0.mlp.down_proj.weight", "I8", "expected U8"],
    );

    std::fs::write(&file, &bytes).unwrap();
    rewrite_tensors(&s.path, |n, d, s, mut b| {
        if n == "model.layers.1.self_attn.k_proj.weight" {
            b[5] = 0xff; // every pair is the invalid code 3
        }
        Some((d, s, b))
    });
    fails_on(
        &s.path,
        &["model.layers.1.self_attn.k_proj.weight", "code 3"],
    );
}

#[test]
fn bad_configs_and_unsupported_models_are_refused() {
    let s = scratch_copy("tiny-packed");
    let config = s.path.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let cases = [
        (
            original.replace("\"bitnet\",\n  \"num", "\"mamba\",\n  \"num"),
            vec!["model_type", "mamba"],
        ),
        (
            original.replace("\"quant_method\": \"bitnet\"", "\"quant_method\": \"gptq\""),
            vec!["quant_method"],
        ),
        (
            original.replace("\"relu2\"", "\"gelu\""),
            vec!["hidden_act", "gelu"],
        ),
        (
            "{\"hidden_size\": ".to_string(),
            vec!["config.json", "invalid config"],
        ),
    ];
    for (text, needles) in cases {
        assert_ne!(text, original);
        std::fs::write(&config, text).unwrap();
        fails_on(&s.path, &needles);
    }
    let bitlinear = scratch_copy("tiny-bitlinear");
    let config = bitlinear.path.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let unknown_class = original.replace(
        "\"quant_method\": \"bitnet\"",
        "\"quant_method\": \"bitnet\", \"linear_class\": \"ternarylinear\"",
    );
    assert_ne!(unknown_class, original);
    std::fs::write(&config, unknown_class).unwrap();
    fails_on(&bitlinear.path, &["linear_class", "ternarylinear"]);
    fails_with(
        &["run", "-m", "/nonexistent/model/dir", "-p", "x"],
        &["/nonexistent/model/dir"],
    );
}

#[test]
fn prompts_longer_than_the_context_are_refused() {
    let dir = fixture_dir("tiny-packed");
    let long = "word ".repeat(40);
    fails_with(
        &[
            "run",
            "-m",
            path_str(&dir),
            "-p",
            &long,
            "--ctx",
            "16",
            "--backend",
            "cpu",
        ],
        &["context of 16", "--ctx"],
    );
    fails_with(
        &[
            "run",
            "-m",
            path_str(&dir),
            "-p",
            "x",
            "--ctx",
            "100000",
            "--backend",
            "cpu",
        ],
        &["exceeds the model's maximum of 512"],
    );
    let ppl = fixture_dir("ppl.txt");
    fails_with(
        &[
            "perplexity",
            "-m",
            path_str(&dir),
            "-f",
            path_str(&ppl),
            "--ctx",
            "4096",
            "--backend",
            "cpu",
        ],
        &["4096", "512"],
    );
}

#[test]
fn chat_keeps_the_conversation_and_obeys_commands() {
    use std::io::Write;
    let dir = fixture_dir("tiny-packed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "chat",
            "-m",
            path_str(&dir),
            "--backend",
            "cpu",
            "--greedy",
            "-n",
            "4",
            "--system",
            "Be brief.",
        ])
        .env("TERN_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is 2 + 2?\nAnd 3 + 3?\n/help\n/clear\nWhat is 2 + 2?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("/clear") && err.contains("conversation cleared"),
        "{err}"
    );
    let replies: Vec<&str> = text.lines().collect();
    assert_eq!(replies.len(), 3, "three replies expected:\n{text}");
    // Greedy: the same first question after /clear gives the same reply.
    assert_eq!(replies[0], replies[2]);
}

#[test]
fn gguf_files_are_detected_and_described() {
    let file = fixture_dir("gguf/tiny-i2_s.gguf");
    let out = ok(&["info", "-m", path_str(&file), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let format = v["format"].as_str().unwrap();
    for needle in ["GGUF v3", "architecture bitnet-b1.58", "I2_S ×14", "F16 ×1"] {
        assert!(
            format.contains(needle),
            "`{format}` should mention `{needle}`"
        );
    }
    assert_eq!(v["activation"], "relu2");

    let s = scratch_copy("tiny-packed");
    let truncated = s.path.join("truncated.gguf");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    fails_with(
        &["run", "-m", path_str(&truncated), "-p", "x"],
        &["truncated.gguf", "past the end"],
    );
    let not_gguf = s.path.join("model.safetensors");
    fails_with(
        &["run", "-m", path_str(&not_gguf), "-p", "x"],
        &["model.safetensors", "not a GGUF file"],
    );
}

#[test]
fn wgpu_backend_runs_benches_and_explains_a_missing_adapter() {
    // tiny-bf16's text case has the longest robust greedy prefix (7 tokens).
    let dir = fixture_dir("tiny-bf16");
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["run", "-m", path_str(&dir), "--backend", "wgpu", "-p", "hi"])
        .env("TERN_WGPU_ADAPTER", "no such adapter")
        .env("TERN_LOG", "warn")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--backend wgpu") && err.contains("adapter") && !err.contains("panicked"),
        "{err}"
    );
    // `--device` chooses the adapter (or the CUDA device number) the same way.
    fails_with(
        &[
            "run",
            "-m",
            path_str(&dir),
            "--backend",
            "wgpu",
            "--device",
            "no such adapter",
            "-p",
            "hi",
        ],
        &["--backend wgpu", "no such adapter"],
    );
    fails_with(
        &[
            "run",
            "-m",
            path_str(&dir),
            "--backend",
            "cuda",
            "--device",
            "gpu-one",
            "-p",
            "hi",
        ],
        &["--backend cuda", "`gpu-one` is not a CUDA device number"],
    );
    if wgpu_backends().is_empty() {
        return; // no adapter here: the reason was printed
    }
    let g = golden("tiny-bf16");
    let case = &g["greedy"]["cases"][1];
    let prompt = case["prompt_text"].as_str().unwrap();
    let robust = case["robust_prefix_len"].as_u64().unwrap() as usize;
    let run = |backend| {
        let args = [
            "run",
            "-m",
            path_str(&dir),
            "--backend",
            backend,
            "-n",
            "8",
            "--greedy",
            "-p",
            prompt,
            "--format",
            "jsonl",
        ];
        jsonl_ids(&ok(&args))
    };
    let (gpu, cpu) = (run("wgpu"), run("cpu"));
    assert_eq!(gpu[..robust], cpu[..robust]);
    assert_eq!(gpu[..robust], ids(&case["new_ids"])[..robust]);

    let out = ok(&[
        "bench",
        "-m",
        path_str(&dir),
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "--backend",
        "wgpu",
        "--format",
        "json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert!(r["backend"].as_str().unwrap().starts_with("wgpu"), "{r}");
        assert!(r["tok_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn tokenize_reads_gguf_files_and_vocab_only_ones() {
    let g = golden("tiny-packed");
    let cases = g["tokenization"].as_array().unwrap();
    // A vocab-only file like llama.cpp's test vocabularies: the fixture's tokenizer keys, no tensors.
    // A folder of its own: a tokenizer.json beside it would win over the metadata.
    let dir = tempfile::tempdir().unwrap();
    let vocab_only = dir.path().join("vocab.gguf");
    let source = tern::gguf::GgufFile::open(&fixture_dir(GGUF_FIXTURES[0])).unwrap();
    let mut w = tern::gguf::write::GgufWriter::default();
    for (key, value) in &source.metadata {
        if key.starts_with("tokenizer.") || key == "general.architecture" {
            w.meta(key.clone(), value.clone());
        }
    }
    w.write(&vocab_only).unwrap();
    let files: Vec<PathBuf> = GGUF_FIXTURES.iter().map(|f| fixture_dir(f)).collect();
    for file in files.iter().chain([&vocab_only]) {
        for case in cases.iter().take(4) {
            let text = case["text"].as_str().unwrap();
            let args = [
                "tokenize",
                "-m",
                path_str(file),
                "-p",
                text,
                "--format",
                "json",
            ];
            let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
            assert_eq!(ids(&v["ids"]), ids(&case["ids_with_special_tokens"]));
            let mut args = args.to_vec();
            args.push("--no-special");
            let v: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
            assert_eq!(v["tokens"], case["tokens_without_special_tokens"]);
        }
    }
    // A vocab-only file has no weights to run.
    fails_with(
        &["run", "-m", path_str(&vocab_only), "-p", "x"],
        &["vocab.gguf", "is missing"],
    );
}

#[test]
fn commands_without_text_run_on_a_model_whose_tokenizer_cannot_be_built() {
    // The fixture with an unknown pre-tokenizer (same length as `llama-bpe`).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("odd.gguf");
    let mut bytes = std::fs::read(fixture_dir(GGUF_FIXTURES[1])).unwrap();
    let at = bytes
        .windows(9)
        .position(|w| w == b"llama-bpe")
        .expect("tokenizer.ggml.pre");
    bytes[at..at + 9].copy_from_slice(b"unknown-x");
    std::fs::write(&file, &bytes).unwrap();
    let file = path_str(&file);
    let reason = ["\"unknown-x\"", "tokenizer.json"];

    let v: serde_json::Value =
        serde_json::from_str(&ok(&["info", "-m", file, "--format", "json"])).unwrap();
    let unavailable = v["tokenizer"]["unavailable"].as_str().unwrap();
    assert!(
        reason.iter().all(|r| unavailable.contains(r)),
        "{unavailable}"
    );
    assert_eq!(v["layers"], 2);

    let args = [
        "bench",
        "-m",
        file,
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "--backend",
        "cpu",
    ];
    let o = tern(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| pp8 |"), "{}", stdout(&o));
    let warning = stderr(&o);
    assert!(
        warning.contains("without a tokenizer") && warning.contains("unknown-x"),
        "{warning}"
    );

    // convert keeps the vocabulary as it was.
    let out = dir.path().join("out.gguf");
    ok(&["convert", "-m", file, "--to", "i2_s", "-o", path_str(&out)]);
    let written = tern::gguf::GgufFile::open(&out).unwrap();
    let pre = written.get("tokenizer.ggml.pre").and_then(|v| v.as_str());
    assert_eq!(pre, Some("unknown-x"));
    assert_eq!(written.tensors.len(), 2 + 2 * 11);

    for command in ["run", "tokenize"] {
        fails_with(&[command, "-m", file, "-p", "x"], &reason);
    }
}

#[test]
fn backend_auto_probes_quietly_and_says_what_it_chose() {
    // Without XDG_RUNTIME_DIR (a server, a CI job) the Vulkan probe must not print the Wayland
    // client's "XDG_RUNTIME_DIR is invalid or not set" error (Mesa's device-select layer asks
    // the compositor for the display GPU), and the one info line names the choice and its reason.
    let dir = fixture_dir("tiny-packed");
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["run", "-m", path_str(&dir), "--backend", "auto"])
        .args(["-n", "1", "--greedy", "-p", "hi"])
        .env_remove("XDG_RUNTIME_DIR")
        .env("TERN_LOG", "info")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("error")), "{err}");
    let chosen: Vec<&str> = err.lines().filter(|l| l.contains("backend:")).collect();
    assert_eq!(chosen.len(), 1, "{err}");
    assert!(chosen[0].contains("chosen by --backend auto: "), "{err}");
}

#[test]
fn run_dumps_named_intermediates_and_refuses_unknown_names() {
    let dir = fixture_dir("tiny-packed");
    let out = tempfile::tempdir().unwrap();
    let (model, dump_dir) = (path_str(&dir), path_str(out.path()));
    let common = [
        "run",
        "-m",
        model,
        "--backend",
        "cpu",
        "-p",
        "Once upon",
        "--greedy",
    ];
    let text = ok(&[
        &common[..],
        &[
            "-n",
            "3",
            "--format",
            "jsonl",
            "--dump",
            "blk.*.l_out,logits",
        ],
        &["--dump-dir", dump_dir],
    ]
    .concat());
    let generated = jsonl_ids(&text);
    let tokenized: serde_json::Value = serde_json::from_str(&ok(&[
        "tokenize",
        "-m",
        model,
        "-p",
        "Once upon",
        "--format",
        "json",
    ]))
    .unwrap();
    let prompt_len = tokenized["ids"].as_array().unwrap().len();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).unwrap()).unwrap();
    let c = load("tiny-packed").config;
    // A prefill, then one decode step per generated token but the last.
    let steps = generated.len() - 1;
    assert_eq!(
        index["logits"]["shape"],
        serde_json::json!([1 + steps, c.vocab])
    );
    for l in 0..c.layers {
        let shape = &index[format!("blk.{l}.l_out")]["shape"];
        assert_eq!(*shape, serde_json::json!([prompt_len + steps, c.hidden]));
    }
    assert!(index.get("blk.0.qkv").is_none());
    let logits: Vec<f32> = std::fs::read(out.path().join("logits.f32.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (row, &id) in logits.chunks_exact(c.vocab).zip(&generated) {
        assert_eq!(argmax(row), id as usize);
    }
    fails_with(
        &[
            &common[..],
            &["--dump", "blk.99.qkv", "--dump-dir", dump_dir],
        ]
        .concat(),
        &["--dump blk.99.qkv", "no such intermediate"],
    );
}

#[test]
fn convert_shape_writes_a_random_model_that_info_reads_with_its_table_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("125m-i2_s.gguf");
    let args = ["convert", "--shape", "125m", "--to", "i2_s", "-o"];
    ok(&[&args[..], &[path_str(&out)]].concat());
    let info = ok(&["info", "-m", path_str(&out), "--format", "json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (&info["layers"], &info["hidden_size"], &info["vocab_size"]),
        (&11.into(), &768.into(), &32002.into())
    );
    let embedding = info["tables"]["embedding"].as_str().unwrap();
    assert!(embedding.starts_with("mapped"), "{embedding}");
    assert_eq!(info["tokenizer"]["vocab_size"], 32002, "{info}");
    fails_with(
        &[
            "convert",
            "--shape",
            "12b",
            "--to",
            "i2_s",
            "-o",
            path_str(&out),
        ],
        &["unknown shape `12b`"],
    );
}
