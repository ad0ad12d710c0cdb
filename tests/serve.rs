//! `tern serve` end to end: the real binary on a free loopback port with the tiny fixture, driven by
//! raw HTTP (every error case, streaming, load with disconnects, shutdown) and by the official
//! `openai` Python package (tests/serve_openai.py; skipped with a reason when the package is
//! missing, unless TERN_REQUIRE_OPENAI=1).

mod common;

use common::{backends, diff, fixture_dir, golden, load};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tern::engine::{Engine, Feed};
use tern::model::LogitsFor;

struct Server {
    child: Child,
    client: Client,
}

/// HTTP/1.1 requests to the server on `port`, one connection each.
#[derive(Clone, Copy)]
struct Client {
    port: u16,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Server {
    /// Starts `tern serve` on the tiny fixture with `extra` flags and waits until it is ready.
    fn start(extra: &[&str]) -> Server {
        let model = fixture_dir("tiny-packed");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["serve", "-m", model.to_str().unwrap(), "--backend", "cpu"])
            .args(["-t", "1", "--port", "0"])
            .args(extra)
            .env("TERN_LOG", "tern=info")
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.rsplit(':').next().unwrap().trim().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let server = Server {
            child,
            client: Client { port },
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.get("/health").0 != 200 {
            assert!(Instant::now() < deadline, "server not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Client {
    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// One request with `Connection: close`; returns status, lower-cased head, body.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Response {
        let mut s = self.connect();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            head += h;
            head += "\r\n";
        }
        head += "\r\n";
        s.write_all(head.as_bytes()).unwrap();
        // The server may answer (413) and close before reading everything.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        Response::parse(&raw)
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        let body = body.to_string();
        self.request(
            "POST",
            path,
            &["Content-Type: application/json"],
            body.as_bytes(),
        )
    }

    /// A metric's value from `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").2;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// Waits until no sequence is active or queued and every slot is free.
    fn wait_idle(&self, slots: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let idle = self.metric("tern_active_sequences") == 0.0
                && self.metric("tern_queue_depth") == 0.0
                && self.metric("tern_kv_slots_used") == 0.0
                && self.metric("tern_kv_slots_free") == slots
                && self.metric("tern_kv_pages_used") == 0.0;
            if idle {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not return to idle:\n{}",
                self.get("/metrics").2
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, head (lower case) and body of an HTTP response (chunked bodies decoded).
type Response = (u16, String, String);

trait Parse {
    fn parse(raw: &[u8]) -> Response;
}

impl Parse for Response {
    fn parse(raw: &[u8]) -> Response {
        let text = String::from_utf8_lossy(raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let head = head.to_lowercase();
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, head, body)
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out += &rest[..n];
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn json_body(r: &Response) -> Value {
    serde_json::from_str(&r.2).unwrap_or_else(|e| panic!("not JSON ({e}): {r:?}"))
}

/// The `data:` payloads of a server-sent-event body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Asserts an OpenAI-shaped error with `status` whose message mentions `needle`.
fn assert_error(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.0, status, "{r:?}");
    assert!(r.1.contains("content-type: application/json"), "{r:?}");
    let v = json_body(r);
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(v["error"]["type"].is_string(), "{r:?}");
    assert!(message.contains(needle), "`{needle}` not in {message}");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&["--parallel", "2"]);
    let good = json!({"prompt": "Hello", "max_tokens": 2});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let post_raw = |body: &[u8]| server.request("POST", "/v1/completions", &[], body);
    assert_error(&post_raw(b"{\"prompt\": \"x\""), 400, "not valid JSON");
    assert_error(&post_raw(b"[1, 2]"), 400, "JSON object");
    assert_error(&post_raw(b""), 400, "not valid JSON");
    for (field, value, needle) in [
        ("temperature", json!("hot"), "`temperature`"),
        ("max_tokens", json!(0), "at least 1"),
        ("max_tokens", json!(-5), "at least 1"),
        ("max_tokens", json!(2.5), "`max_tokens`"),
        ("top_p", json!(1.5), "between 0 and 1"),
        ("temperature", json!(-1), "between 0"),
        ("n", json!(2), "n = 1"),
        ("stream", json!("yes"), "`stream`"),
        ("stop", json!(7), "`stop`"),
        ("seed", json!(-1), "`seed`"),
        ("logprobs", json!(50), "between 0 and 20"),
        ("presence_penalty", json!(2.5), "between -2 and 2"),
        ("frequency_penalty", json!("high"), "`frequency_penalty`"),
        ("stream_options", json!(true), "must be an object"),
        ("prompt", json!({"a": 1}), "`prompt`"),
        ("prompt", json!([1, 99999]), "outside the vocabulary"),
        (
            "prompt",
            json!((0..600).map(|i| i % 1000).collect::<Vec<_>>()),
            "no room",
        ),
    ] {
        let r = server.post("/v1/completions", &with(field, value));
        assert_error(&r, 400, needle);
        assert_eq!(
            json_body(&r)["error"]["param"].as_str().is_some(),
            field != "prompt" || needle != "no room",
            "{r:?}"
        );
    }
    let chat =
        |messages: Value| server.post("/v1/chat/completions", &json!({"messages": messages}));
    assert_error(&chat(json!("hi")), 400, "`messages` must be an array");
    assert_error(&chat(json!([])), 400, "empty");
    assert_error(&chat(json!([{"role": 3, "content": "x"}])), 400, "`role`");
    assert_error(
        &server.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        ),
        400,
        "needs `logprobs: true`",
    );
    assert_error(
        &server.post("/v1/completions", &with("model", json!("gpt-4"))),
        404,
        "not served here",
    );
    assert_error(&server.get("/v1/nothing"), 404, "no route");
    assert_error(&server.get("/v1/completions"), 405, "not allowed");
    let big = vec![b' '; tern::server::MAX_BODY_BYTES + 1];
    assert_error(&post_raw(&big), 413, "exceeds");
    assert_error(
        &server.post("/detokenize", &json!({"tokens": [5000]})),
        400,
        "outside the vocabulary",
    );
    assert_error(
        &server.post("/tokenize", &json!({"content": 5})),
        400,
        "`content`",
    );
    // Still serving, and nothing leaked.
    let r = server.post("/v1/completions", &good);
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(json_body(&r)["usage"]["completion_tokens"], 2);
    server.wait_idle(2.0);
}

#[test]
fn api_key_is_required_on_every_route_but_health() {
    let server = Server::start(&["--api-key", "sesame"]);
    assert_eq!(server.get("/health").0, 200);
    assert_error(&server.get("/v1/models"), 401, "API key");
    let body = json!({"prompt": "Hi", "max_tokens": 1}).to_string();
    let wrong = server.request(
        "POST",
        "/v1/completions",
        &["Authorization: Bearer nope"],
        body.as_bytes(),
    );
    assert_error(&wrong, 401, "API key");
    let right = server.request(
        "POST",
        "/v1/completions",
        &["Authorization: Bearer sesame"],
        body.as_bytes(),
    );
    assert_eq!(right.0, 200, "{right:?}");
    let models = server.request("GET", "/v1/models", &["Authorization: Bearer sesame"], b"");
    assert!(
        json_body(&models)["data"][0]["id"]
            .as_str()
            .unwrap()
            .ends_with("tiny-packed")
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let server = Server::start(&["--parallel", "1", "--max-queue", "1"]);
    let port = server.port;
    // One slot and room for one waiting request: of many long requests at once, some are refused.
    let handles: Vec<_> = (0..12)
        .map(|_| {
            std::thread::spawn(move || {
                Client { port }.post(
                    "/v1/completions",
                    &json!({"prompt": "Once upon", "max_tokens": 400, "temperature": 0}),
                )
            })
        })
        .collect();
    let results: Vec<Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(!refused.is_empty(), "no request was refused");
    for r in &refused {
        assert_error(r, 503, "queue is full");
        assert!(r.1.contains("retry-after: 1"), "{r:?}");
    }
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 503));
    assert!(server.metric("tern_requests_rejected_total") >= refused.len() as f64);
    server.wait_idle(1.0);
}

#[test]
fn a_small_kv_pool_makes_requests_wait_for_pages_and_all_complete() {
    // tiny-packed: 2 layers × 2 kv heads × 64 dims, so a page of 16 positions takes 32 KiB of K
    // and V. 4 pages hold one request of ~40 positions at a time, though 4 slots are free.
    let server = Server::start(&["--parallel", "4", "--kv-memory", "128KiB"]);
    assert_eq!(server.metric("tern_kv_pages_free"), 4.0);
    let port = server.port;
    let handles: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || stream_completion(port, 32, None)))
        .collect();
    for h in handles {
        let (tokens, finish, usage) = h.join().unwrap();
        assert_eq!(tokens as u64, usage, "{finish}");
        assert!(finish == "length" || finish == "stop", "{finish}");
    }
    server.wait_idle(4.0);
    assert_eq!(server.metric("tern_kv_pages_free"), 4.0);
    // A prompt longer than the pool holds is refused like one longer than the context.
    let long = "word ".repeat(80);
    let r = server.post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_error(&r, 400, "context");
}

/// Runs `tern run` and returns its stdout.
fn tern_run(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("run")
        .args(args)
        .env("TERN_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn greedy_output_equals_tern_run_greedy_on_the_golden_prompts() {
    let server = Server::start(&["--parallel", "3"]);
    let model = fixture_dir("tiny-packed");
    let model = model.to_str().unwrap();
    let g = golden("tiny-packed");
    for case in g["greedy"]["cases"].as_array().unwrap() {
        let base = [
            "-m",
            model,
            "--backend",
            "cpu",
            "-t",
            "1",
            "-n",
            "16",
            "--greedy",
        ];
        let (expected, path, body) = match case.get("prompt_messages") {
            Some(messages) => {
                let (mut system, mut user) = (String::new(), String::new());
                for m in messages.as_array().unwrap() {
                    let c = m["content"].as_str().unwrap().to_string();
                    match m["role"].as_str().unwrap() {
                        "system" => system = c,
                        _ => user = c,
                    }
                }
                let out =
                    tern_run(&[&base[..], &["--chat", "--system", &system, "-p", &user]].concat());
                let body = json!({"messages": messages, "max_tokens": 16, "temperature": 0});
                (out, "/v1/chat/completions", body)
            }
            None => {
                let prompt = case["prompt_text"].as_str().unwrap();
                let out = tern_run(&[&base[..], &["-p", prompt]].concat());
                (
                    out,
                    "/v1/completions",
                    json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
                )
            }
        };
        let expected = expected.strip_suffix('\n').unwrap();
        let r = server.post(path, &body);
        let v = json_body(&r);
        let choice = &v["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["message"]["content"].as_str())
            .unwrap();
        assert_eq!(text, expected, "{path} {body}");
        // Streamed, the same text arrives in pieces.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let r = server.post(path, &streamed);
        let chunks: String = sse_data(&r.2)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| {
                let c: Value = serde_json::from_str(d).unwrap();
                let c = &c["choices"][0];
                c["text"]
                    .as_str()
                    .or(c["delta"]["content"].as_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(chunks, expected);
    }
}

#[test]
fn frequency_and_presence_penalties_apply_as_in_tern_run() {
    let server = Server::start(&["--parallel", "2"]);
    let model = fixture_dir("tiny-packed");
    let g = golden("tiny-packed");
    let prompt = g["greedy"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|c| c["prompt_text"].as_str())
        .unwrap()
        .to_string();
    let run = |penalties: &[&str]| {
        let base = ["-m", model.to_str().unwrap(), "--backend", "cpu", "-t", "1"];
        let args = [
            &base[..],
            &["-n", "24", "--greedy", "-p", &prompt],
            penalties,
        ]
        .concat();
        tern_run(&args).strip_suffix('\n').unwrap().to_string()
    };
    let plain = run(&[]);
    for (field, flag) in [
        ("frequency_penalty", "--frequency-penalty"),
        ("presence_penalty", "--presence-penalty"),
    ] {
        let penalized = run(&[flag, "1.5"]);
        assert_ne!(plain, penalized, "{flag} changes nothing on this prompt");
        let mut body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0});
        body[field] = json!(1.5);
        let text = json_body(&server.post("/v1/completions", &body))["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(text, penalized, "{field}");
    }
}

#[test]
fn a_seed_gives_the_same_text_alone_and_batched_and_stop_strings_cut() {
    let server = Server::start(&["--parallel", "4"]);
    let body = |seed: u64| json!({"prompt": "The cat", "max_tokens": 24, "temperature": 1.0, "seed": seed, "logprobs": 2});
    let text = |r: &Response| {
        json_body(r)["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let alone = text(&server.post("/v1/completions", &body(7)));
    let port = server.port;
    let batched: Vec<String> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let seed = if i == 2 { 7 } else { 100 + i };
                let r = Client { port }.post("/v1/completions", &json!({"prompt": if i == 2 { "The cat" } else { "A much longer prompt about other things entirely" }, "max_tokens": 24, "temperature": 1.0, "seed": seed, "logprobs": 2}));
                json_body(&r)["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(batched[2], alone);
    // A stop string taken from the middle of that text cuts it there, whatever the token boundaries.
    let cut = alone
        .char_indices()
        .nth(alone.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = alone[cut..].chars().take(3).collect();
    let first = alone.find(&stop).unwrap();
    let mut b = body(7);
    b["stop"] = json!([stop]);
    let r = server.post("/v1/completions", &b);
    let v = json_body(&r);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &alone[..first]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    server.wait_idle(4.0);
}

/// `--lm-head auto` takes the 8-bit head for the steps whose rows read only their top logits: the
/// same text as the full head for top-k sampling, and the full head's log-probabilities.
#[test]
fn the_head_chosen_per_step_changes_no_output() {
    let auto = Server::start(&[]);
    let full = Server::start(&["--lm-head", "f16"]);
    let ask = |server: &Server, extra: Value| {
        let mut body =
            json!({"prompt": "The cat", "max_tokens": 16, "temperature": 1.0, "seed": 11});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json_body(&server.post("/v1/completions", &body))["choices"][0].clone()
    };
    let top_k = json!({"top_k": 40});
    assert_eq!(ask(&auto, top_k.clone())["text"], ask(&full, top_k)["text"]);
    let logprobs = json!({"top_k": 40, "logprobs": 3});
    let (a, f) = (ask(&auto, logprobs.clone()), ask(&full, logprobs));
    assert_eq!(a["text"], f["text"]);
    assert_eq!(a["logprobs"], f["logprobs"]);
}

/// A prompt repeated (or extended, like a chat's next turn) takes the earlier prompt's full KV
/// pages from the cache, and its greedy text is that of a server that computes every prompt.
#[test]
fn a_repeated_prompt_prefix_comes_from_cached_pages_with_the_same_text() {
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(5);
    // The text and `usage.prompt_tokens_details.cached_tokens`.
    let complete = |server: &Server, prompt: &str| {
        let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0});
        let v = json_body(&server.post("/v1/completions", &body));
        let cached = &v["usage"]["prompt_tokens_details"]["cached_tokens"];
        (
            v["choices"][0]["text"].as_str().unwrap().to_string(),
            cached.as_u64().unwrap(),
        )
    };
    let plain = Server::start(&["--parallel", "2", "--no-prefix-cache"]);
    let cached = Server::start(&["--parallel", "2"]);
    let longer = format!("{prompt}and then");
    let mut taken = Vec::new();
    for p in [&prompt, &prompt, &longer] {
        let (text, reused) = complete(&cached, p);
        assert_eq!((text, 0), complete(&plain, p), "{p}");
        taken.push(reused);
    }
    assert_eq!(taken[0], 0);
    assert!(taken[1] >= 32 && taken[1] % 16 == 0, "{taken:?}");
    assert!(taken[2] >= taken[1], "{taken:?}");
    let total = cached.metric("tern_prompt_tokens_cached_total");
    assert_eq!(total, (taken[1] + taken[2]) as f64);
    assert_eq!(plain.metric("tern_prompt_tokens_cached_total"), 0.0);
    cached.wait_idle(2.0);
    assert!(cached.metric("tern_kv_pages_cached") > 0.0);
    assert_eq!(plain.metric("tern_kv_pages_cached"), 0.0);
}

#[test]
fn tokenize_detokenize_and_models() {
    let server = Server::start(&[]);
    let v = json_body(&server.post(
        "/tokenize",
        &json!({"content": "Hello world", "add_special": true}),
    ));
    let ids: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(ids[0], 1008, "BOS first with add_special");
    let back = json_body(&server.post("/detokenize", &json!({"tokens": ids[1..]})));
    assert_eq!(back["content"], "Hello world");
    let pieces = json_body(&server.post(
        "/tokenize",
        &json!({"content": "Hello world", "with_pieces": true}),
    ));
    let joined: String = pieces["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["piece"].as_str().unwrap())
        .collect();
    assert_eq!(joined, "Hello world");
    let models = json_body(&server.get("/v1/models"));
    assert_eq!(models["object"], "list");
}

/// One streaming completion over raw TCP; with `drop_after`, the client disconnects after that many
/// token chunks. Returns (token chunks, finish reason, usage.completion_tokens).
fn stream_completion(
    port: u16,
    max_tokens: usize,
    drop_after: Option<usize>,
) -> (usize, String, u64) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": true,
                      "stream_options": {"include_usage": true}})
    .to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(s);
    let (mut tokens, mut finish, mut usage) = (0, String::new(), 0);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            usage = u;
        }
        match v["choices"][0]["finish_reason"].as_str() {
            Some(f) => finish = f.to_string(),
            None if v["choices"][0]["text"].is_string() => tokens += 1,
            None => {}
        }
        if drop_after == Some(tokens) {
            return (tokens, "disconnected".into(), 0);
        }
    }
    (tokens, finish, usage)
}

#[test]
fn load_64_streams_with_a_quarter_disconnecting() {
    let slots = 16;
    let server = Server::start(&["--parallel", &slots.to_string(), "--max-queue", "128"]);
    let port = server.port;
    let max_tokens = 32;
    let mut rss = Vec::new();
    let pages = server.metric("tern_kv_pages_free");
    assert!(pages > 0.0);
    for _round in 0..4 {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                std::thread::spawn(move || {
                    let drop_after = (i % 4 == 0).then_some(3);
                    (drop_after, stream_completion(port, max_tokens, drop_after))
                })
            })
            .collect();
        for h in handles {
            let (drop_after, (tokens, finish, usage)) = h.join().unwrap();
            if drop_after.is_some() {
                continue;
            }
            // Every token is one chunk; a request ends at max_tokens or at an end-of-sequence id.
            assert_eq!(tokens as u64, usage, "{finish}");
            match finish.as_str() {
                "length" => assert_eq!(tokens, max_tokens),
                "stop" => assert!(tokens <= max_tokens),
                other => panic!("finish {other}"),
            }
        }
        server.wait_idle(slots as f64);
        assert_eq!(
            server.metric("tern_kv_pages_free"),
            pages,
            "a KV page leaked"
        );
        assert_eq!(server.get("/health").0, 200);
        rss.push(server.rss_kib());
    }
    assert!(server.metric("tern_requests_cancelled_total") >= 1.0);
    assert_eq!(server.metric("tern_requests_total"), 256.0);
    // The first round warms allocators and buffers; later rounds must not grow.
    assert!(
        rss[3] <= rss[1] + rss[1] / 10 + 4096,
        "RSS grew: {rss:?} KiB"
    );
}

#[test]
fn sigterm_finishes_running_streams_and_exits_zero() {
    let mut server = Server::start(&[]);
    let port = server.port;
    let stream = std::thread::spawn(move || stream_completion(port, 200, None));
    // Wait until the stream is running, then ask the server to stop. On the tiny model a stream
    // can also finish between two polls; the server must then still stop cleanly.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("tern_active_sequences") == 0.0 && !stream.is_finished() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    server.terminate();
    let (tokens, finish, usage) = stream.join().unwrap();
    assert!(finish == "length" || finish == "stop", "{finish}");
    assert_eq!(tokens as u64, usage);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn openai_python_client() {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var("TERN_REQUIRE_OPENAI").as_deref() != Ok("1"),
            "TERN_REQUIRE_OPENAI=1 but the `openai` Python package is not importable"
        );
        eprintln!("skipped: the `openai` Python package is not installed (pip install openai)");
        return;
    }
    let server = Server::start(&["--parallel", "2", "--api-key", "k"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("openai client: all checks passed"), "{text}");
}

/// The scheduler's mixed batch: decode rows of several sequences (different slots and positions)
/// and prompt chunks (one completing, one not) in one batch give each sequence the logits it gets
/// when fed alone, on every backend; a batch with a full sequence is refused and changes no
/// sequence.
#[test]
fn feed_batch_gives_each_sequence_its_own_logits() {
    let model = load("tiny-packed");
    for (name, backend) in backends() {
        let mut engine = Engine::new(&model, backend, 24, 5).unwrap();
        let seqs: Vec<_> = (0..5).map(|_| engine.new_sequence().unwrap()).collect();
        let prompts: [&[u32]; 3] = [
            &[1008, 50, 968],
            &[1008, 7],
            &[1008, 300, 301, 302, 303, 304],
        ];
        for (&s, p) in seqs.iter().zip(prompts) {
            engine.feed(s, p, LogitsFor::Last).unwrap();
        }
        // Decode rows for the first three, a completing prompt for the fourth and a chunk without
        // logits for the fifth, the logit rows not last in item order.
        let next = [11u32, 12, 13];
        let completing: &[u32] = &[1008, 40, 41, 42];
        let partial: &[u32] = &[1008, 60, 61];
        let decode: Vec<Feed> = seqs[..3]
            .iter()
            .zip(&next)
            .map(|(&seq, t)| Feed {
                seq,
                tokens: std::slice::from_ref(t),
                logits: true,
            })
            .collect();
        let mut items = decode.clone();
        items.insert(
            1,
            Feed {
                seq: seqs[4],
                tokens: partial,
                logits: false,
            },
        );
        items.insert(
            2,
            Feed {
                seq: seqs[3],
                tokens: completing,
                logits: true,
            },
        );
        let batched = engine.feed_batch(&items).unwrap();
        let vocab = batched.len() / 4;
        assert_eq!(batched.len(), 4 * vocab, "{name}");
        let with_logits: Vec<&Feed> = items.iter().filter(|i| i.logits).collect();
        for (i, item) in with_logits.iter().enumerate() {
            let len = engine.sequence_len(item.seq).unwrap();
            engine.truncate(item.seq, len - item.tokens.len()).unwrap();
            let alone = engine.feed(item.seq, item.tokens, LogitsFor::Last).unwrap();
            let (max, _) = diff(&batched[i * vocab..(i + 1) * vocab], &alone);
            assert!(max < 1e-3, "{name}: item {i} differs by {max}");
        }
        // The chunk without logits was cached: continuing it matches feeding it whole.
        let after = engine.feed(seqs[4], &[70], LogitsFor::Last).unwrap();
        engine.clear(seqs[4]).unwrap();
        let whole = engine
            .feed(seqs[4], &[1008, 60, 61, 70], LogitsFor::Last)
            .unwrap();
        let (max, _) = diff(&after, &whole);
        assert!(max < 1e-3, "{name}: cached chunk differs by {max}");

        let lens: Vec<_> = seqs
            .iter()
            .map(|&s| engine.sequence_len(s).unwrap())
            .collect();
        let fill = vec![5; 24 - lens[2]];
        engine.feed(seqs[2], &fill, LogitsFor::Last).unwrap();
        let err = engine.feed_batch(&decode).unwrap_err().to_string();
        assert!(err.contains("context"), "{name}: {err}");
        assert_eq!(engine.sequence_len(seqs[0]).unwrap(), lens[0], "{name}");
        assert_eq!(engine.sequence_len(seqs[1]).unwrap(), lens[1], "{name}");
        let twice = [decode[0], decode[0]];
        let err = engine.feed_batch(&twice).unwrap_err().to_string();
        assert!(err.contains("twice"), "{name}: {err}");
    }
}
