//! `tern serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the [`scheduler`].
//!
//! Threads: tokio's workers run the HTTP side (parsing, tokenizing, chat templates, detokenizing,
//! stop strings, response JSON); one scheduler thread owns the engine. They talk through channels:
//! a request becomes a [`scheduler::Job`] carrying the sender of its own event channel, and the
//! request's side turns events into a JSON body or server-sent events. Dropping the receiving side
//! (a client that disconnects, or a stop string found) is how a request is cancelled: the
//! scheduler sees the closed channel at its next step and frees the slot.
//!
//! Lifecycle: the listener is bound first and answers `/health` with 503 while the model loads;
//! SIGINT/SIGTERM starts draining (`/health` 503, new requests 503, waiting ones refused, running
//! ones finish or are cancelled after the grace period), then the process exits 0.

pub mod api;
pub mod metrics;
pub mod scheduler;
mod stops;

use crate::engine::{Engine, FinishReason, GeneratedToken};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use api::{ApiError, Body, Generation};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::Metrics;
use scheduler::{Command, Event, Job, Scheduler};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use stops::StopMatcher;
use tokio::sync::mpsc;

/// Largest request body accepted (413 above).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// How the server is reached and how it admits work.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every route but `/health`.
    pub api_key: Option<String>,
    /// The name `/v1/models` reports and requests may give as `model`.
    pub model_id: String,
    /// Requests that may wait for a KV slot; more get 503 with `Retry-After`.
    pub max_queue: usize,
    /// How long running requests may continue after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// Choose the output head per step (`--lm-head auto`): the 8-bit copy when every row sampled
    /// in the step reads only its top [`Q8_EXACT_TOP_K`](crate::backend::Q8_EXACT_TOP_K), where
    /// the backend has one; otherwise the head the loader set stays.
    pub head_per_step: bool,
}

/// Builds the engine and tokenizer; runs on the scheduler thread, which then owns the engine.
pub type Loader = Box<dyn FnOnce() -> Result<(Engine, Tokenizer, Vec<u32>)> + Send>;

/// What handlers need once the model is loaded.
struct Ready {
    tokenizer: Arc<Tokenizer>,
    context: usize,
    stop_ids: Vec<u32>,
}

struct AppState {
    options: ServeOptions,
    ready: OnceLock<Ready>,
    draining: AtomicBool,
    commands: std::sync::mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    created: u64,
}

type Shared = Arc<AppState>;

/// Serves until SIGINT/SIGTERM, then drains and returns. Fails if the address cannot be bound or
/// the model cannot be loaded.
pub fn serve(options: ServeOptions, load: Loader) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(options, load))
}

async fn run(options: ServeOptions, load: Loader) -> Result<()> {
    let addr = format!("{}:{}", options.host, options.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && options.api_key.is_none() {
        tracing::warn!(
            "listening on {} without --api-key: anyone who can reach this address can use the model",
            local.ip()
        );
    }
    let metrics = Arc::new(Metrics::default());
    let (commands, command_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let scheduler_metrics = metrics.clone();
    let head_per_step = options.head_per_step;
    let scheduler = std::thread::Builder::new()
        .name("tern-scheduler".into())
        .spawn(move || match load() {
            Ok((engine, tokenizer, stop_ids)) => {
                let context = engine.context();
                let ready = Ready {
                    tokenizer: Arc::new(tokenizer),
                    context,
                    stop_ids,
                };
                let _ = ready_tx.send(Ok(ready));
                Scheduler::new(engine, scheduler_metrics, head_per_step).run(command_rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .context("cannot start the scheduler thread")?;
    let state = Arc::new(AppState {
        ready: OnceLock::new(),
        draining: AtomicBool::new(false),
        commands,
        metrics,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        options,
    });
    tracing::info!("listening on http://{local}");

    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let loading = state.clone();
    tokio::spawn(async move {
        match ready_rx.await {
            Ok(Ok(ready)) => {
                let _ = loading.ready.set(ready);
                tracing::info!("model loaded; ready");
            }
            Ok(Err(e)) => {
                let _ = fatal_tx.send(e);
            }
            Err(_) => {
                let _ = fatal_tx.send(anyhow::anyhow!(
                    "the scheduler thread stopped while loading"
                ));
            }
        }
    });
    let fatal = Arc::new(std::sync::Mutex::new(None));
    let fatal_slot = fatal.clone();
    let draining = state.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => tracing::info!("shutting down: draining requests"),
            Ok(e) = fatal_rx => {
                if let Ok(mut slot) = fatal_slot.lock() {
                    *slot = Some(e);
                }
            }
        }
        draining.draining.store(true, Relaxed);
        let grace = draining.options.shutdown_grace;
        let _ = draining.commands.send(Command::Shutdown { grace });
    };
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(stop)
        .await
        .context("the HTTP server failed")?;
    // Dropping the last sender lets an idle scheduler return.
    drop(state);
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    if let Some(e) = fatal.lock().ok().and_then(|mut f| f.take()) {
        return Err(e.context("cannot load the model"));
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Every route but `/health` needs the key when one is set.
async fn authorize(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key
        && request.uri().path() != "/health"
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send `Authorization: Bearer KEY`)",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(request).await
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn health(State(state): State<Shared>) -> Response {
    let (status, text) = if state.draining.load(Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if state.ready.get().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading model")
    } else {
        (StatusCode::OK, "ok")
    };
    (status, axum::Json(json!({ "status": text }))).into_response()
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn models(State(state): State<Shared>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.options.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "tern",
        }],
    }))
    .into_response()
}

/// The loaded model, or 503 while loading or draining.
fn ready(state: &AppState) -> Result<&Ready, ApiError> {
    if state.draining.load(Relaxed) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    state
        .ready
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is still loading"))
}

/// The body as a JSON object; a body over the limit is 413.
fn body(bytes: Result<Bytes, BytesRejection>) -> Result<Body, ApiError> {
    let bytes = bytes.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(status, format!("cannot read the request body: {r}"))
        }
    })?;
    Body::parse(&bytes)
}

/// `model`, when given, must name the served model (or its file name).
fn check_model(state: &AppState, body: &Body) -> Result<(), ApiError> {
    let Some(name) = body.get::<String>("model")? else {
        return Ok(());
    };
    let id = &state.options.model_id;
    let base = std::path::Path::new(id)
        .file_name()
        .and_then(|b| b.to_str());
    if name == *id || Some(name.as_str()) == base {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model `{name}` is not served here (this server has `{id}`)"),
        )
        .code("model_not_found"))
    }
}

async fn tokenize(State(state): State<Shared>, bytes: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let ready = ready(&state)?;
        let body = body(bytes)?;
        let content = body
            .get::<String>("content")?
            .ok_or_else(|| ApiError::bad("`content` is required"))?;
        let add_special = body.get::<bool>("add_special")?.unwrap_or(false);
        let with_pieces = body.get::<bool>("with_pieces")?.unwrap_or(false);
        let ids = ready
            .tokenizer
            .encode(&content, add_special)
            .map_err(|e| ApiError::bad(format!("{e:#}")))?;
        let tokens: Vec<Value> = if with_pieces {
            ids.iter()
                .map(|&id| {
                    let piece = ready.tokenizer.decode(&[id], false).unwrap_or_default();
                    json!({"id": id, "piece": piece})
                })
                .collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        Ok(json!({ "tokens": tokens }))
    };
    respond(run())
}

async fn detokenize(State(state): State<Shared>, bytes: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Value, ApiError> {
        let ready = ready(&state)?;
        let body = body(bytes)?;
        let ids = body
            .get::<Vec<u32>>("tokens")?
            .ok_or_else(|| ApiError::bad("`tokens` is required"))?;
        api::check_ids(&ids, ready.tokenizer.vocab_size(), "tokens")?;
        let content = ready
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::bad(format!("{e:#}")))?;
        Ok(json!({ "content": content }))
    };
    respond(run())
}

fn respond(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Which endpoint a generation answers: it decides the JSON shapes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(
    State(state): State<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, bytes, Kind::Chat).await
}

async fn completions(
    State(state): State<Shared>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, bytes, Kind::Completion).await
}

/// A validated request, ready for the scheduler.
struct Prepared {
    prompt: Vec<u32>,
    generation: Generation,
    max_tokens: usize,
}

fn prepare(
    state: &AppState,
    bytes: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    let ready = ready(state)?;
    let body = body(bytes)?;
    check_model(state, &body)?;
    let generation = api::generation(&body, kind == Kind::Chat)?;
    let tokenizer = &ready.tokenizer;
    let prompt = match kind {
        Kind::Chat => {
            let messages = api::messages(&body)?;
            let template = tokenizer.chat_template().ok_or_else(|| {
                ApiError::bad("this model has no chat template; use /v1/completions")
            })?;
            let text = template
                .render(&messages, true)
                .map_err(|e| ApiError::bad(format!("{e:#}")).code("invalid_messages"))?;
            tokenizer
                .encode(&text, false)
                .map_err(|e| ApiError::bad(format!("{e:#}")))?
        }
        Kind::Completion => api::prompt_ids(&body, tokenizer)?,
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty (no tokens)"));
    }
    let room = ready.context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens, which leaves no room to generate in a context of {}",
            prompt.len(),
            ready.context
        ))
        .code("context_length_exceeded"));
    }
    // OpenAI's completions default to 16 tokens; chat replies run until a stop or the context ends.
    let max_tokens = generation.max_tokens.unwrap_or(match kind {
        Kind::Completion => 16,
        Kind::Chat => room,
    });
    Ok(Prepared {
        prompt,
        generation,
        max_tokens,
    })
}

async fn generate(state: Shared, bytes: Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    let arrived = Instant::now();
    let prepared = match prepare(&state, bytes, kind) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let Some(ready) = state.ready.get() else {
        return ApiError::unavailable("the model is still loading").into_response();
    };
    // Admission: the queue depth is counted before the job is sent, so the bound holds under races.
    let m = &state.metrics;
    if m.queue_depth.fetch_add(1, Relaxed) >= state.options.max_queue as u64 {
        m.queue_depth.fetch_sub(1, Relaxed);
        m.rejected.fetch_add(1, Relaxed);
        return ApiError::unavailable(format!(
            "the queue is full ({} requests waiting); retry later",
            state.options.max_queue
        ))
        .into_response();
    }
    let (events, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prepared.prompt.len();
    let g = &prepared.generation;
    let job = Job {
        prompt: prepared.prompt,
        max_tokens: prepared.max_tokens,
        sampling: g.sampling,
        stop_ids: ready.stop_ids.clone(),
        logprobs: g.logprobs,
        top_logprobs: g.top_logprobs,
        arrived,
        events,
    };
    if state
        .commands
        .send(Command::Generate(Box::new(job)))
        .is_err()
    {
        m.queue_depth.fetch_sub(1, Relaxed);
        return ApiError::unavailable("the scheduler has stopped").into_response();
    }
    m.requests.fetch_add(1, Relaxed);
    let reply = Reply {
        kind,
        id: format!(
            "{}-{:x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand_id()
        ),
        created: state.created,
        model: state.options.model_id.clone(),
        logprobs: g.logprobs,
        include_usage: g.include_usage,
        prompt_tokens,
    };
    let stops = prepared.generation.stops.clone();
    let tokenizer = ready.tokenizer.clone();
    if prepared.generation.stream {
        stream(reply, tokenizer, rx, stops).await
    } else {
        complete(reply, tokenizer, rx, stops).await
    }
}

/// A request id: unique enough for logs and clients (time and a counter).
fn rand_id() -> u128 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (now << 16) ^ u128::from(COUNTER.fetch_add(1, Relaxed))
}

/// The identity and options of one response.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
}

/// What the event consumer produces.
enum Out {
    /// Text to send, and the token it came from (none for text released at the end).
    Piece(String, Option<GeneratedToken>),
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    Error(ApiError),
}

/// Turns a job's events into text pieces: detokenizes, applies stop strings, counts tokens.
struct Consumer<'t> {
    rx: mpsc::UnboundedReceiver<Event>,
    decoder: crate::tokenizer::StreamDecoder<'t>,
    stops: StopMatcher,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    /// Outputs decided but not yet returned; after the last one, `finished`.
    queue: std::collections::VecDeque<Out>,
    finished: bool,
}

impl<'t> Consumer<'t> {
    fn new(
        tokenizer: &'t Tokenizer,
        rx: mpsc::UnboundedReceiver<Event>,
        stops: Vec<String>,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            rx,
            decoder: tokenizer.stream_decoder(true),
            stops: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            queue: Default::default(),
            finished: false,
        }
    }

    /// The next output; `None` after `Done` or `Error`.
    async fn next(&mut self) -> Option<Out> {
        if let Some(out) = self.queue.pop_front() {
            return Some(out);
        }
        if self.finished {
            return None;
        }
        let event = loop {
            match self.rx.recv().await {
                Some(Event::Started { cached_tokens }) => self.cached_tokens = cached_tokens,
                other => break other,
            }
        };
        match event {
            Some(Event::Token(token)) => {
                self.completion_tokens += 1;
                match self.decoder.push(token.id) {
                    Ok(text) => {
                        let (text, stop) = self.stops.push(&text);
                        self.queue.push_back(Out::Piece(text, Some(token)));
                        if stop {
                            // Closing the channel cancels the sequence at the scheduler's next step.
                            self.rx.close();
                            self.done("stop");
                        }
                    }
                    Err(e) => self.fail(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{e:#}"),
                    )),
                }
            }
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                self.prompt_tokens = prompt_tokens;
                self.completion_tokens = completion_tokens;
                if finish == FinishReason::Cancelled {
                    self.fail(ApiError::unavailable(
                        "the server shut down before the request finished",
                    ));
                } else {
                    let rest = self.decoder.finish().unwrap_or_default();
                    let (mut text, stop) = self.stops.push(&rest);
                    if !stop {
                        text += &self.stops.finish();
                    }
                    if !text.is_empty() {
                        self.queue.push_back(Out::Piece(text, None));
                    }
                    let stopped = stop || finish == FinishReason::Stop;
                    self.done(if stopped { "stop" } else { "length" });
                }
            }
            Some(Event::Error { message, retry }) => self.fail(if retry {
                ApiError::unavailable(message)
            } else {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
            }),
            // `Started` was taken by the loop above.
            Some(Event::Started { .. }) | None => self.fail(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scheduler stopped",
            )),
        }
        self.queue.pop_front()
    }

    fn done(&mut self, finish: &'static str) {
        self.finished = true;
        self.queue.push_back(Out::Done {
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
        });
    }

    fn fail(&mut self, e: ApiError) {
        self.finished = true;
        self.queue.push_back(Out::Error(e));
    }
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn logprobs(&self, tokenizer: &Tokenizer, tokens: &[(GeneratedToken, usize)]) -> Value {
        match (self.logprobs, self.kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => api::chat_logprobs(tokenizer, tokens),
            (true, Kind::Completion) => api::completion_logprobs(tokenizer, tokens),
        }
    }

    /// A response or chunk around `choice` (`choices` empty when `None`).
    fn envelope(&self, chunk: bool, choice: Option<Value>, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choice.into_iter().collect::<Vec<_>>(),
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// One stream chunk carrying `text` (chat: as `delta.content`).
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        let mut choice = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
        match self.kind {
            Kind::Chat if text.is_empty() && finish.is_some() => choice["delta"] = json!({}),
            Kind::Chat => choice["delta"] = json!({"content": text}),
            Kind::Completion => choice["text"] = json!(text),
        }
        self.envelope(true, Some(choice), None)
    }
}

/// A non-streaming reply: waits for the whole generation.
async fn complete(
    reply: Reply,
    tokenizer: Arc<Tokenizer>,
    rx: mpsc::UnboundedReceiver<Event>,
    stops: Vec<String>,
) -> Response {
    let mut consumer = Consumer::new(&tokenizer, rx, stops, reply.prompt_tokens);
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(out) = consumer.next().await {
        match out {
            Out::Piece(piece, token) => {
                if let Some(t) = token.filter(|_| reply.logprobs) {
                    tokens.push((t, text.len()));
                }
                text += &piece;
            }
            Out::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let logprobs = reply.logprobs(&tokenizer, &tokens);
                let mut choice = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
                match reply.kind {
                    Kind::Chat => {
                        choice["message"] = json!({"role": "assistant", "content": text});
                    }
                    Kind::Completion => choice["text"] = json!(text),
                }
                let usage = api::usage(prompt_tokens, completion_tokens, cached_tokens);
                return axum::Json(reply.envelope(false, Some(choice), Some(usage)))
                    .into_response();
            }
            Out::Error(e) => return e.into_response(),
        }
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the generation ended without a result",
    )
    .into_response()
}

/// A streaming reply: server-sent events, one chunk per token, a final chunk with the finish
/// reason (and any text held back to the end), a usage chunk when asked, then `[DONE]`. A task relays the scheduler's events; when the
/// client goes away the event stream is dropped, the task ends and the sequence is cancelled.
async fn stream(
    reply: Reply,
    tokenizer: Arc<Tokenizer>,
    rx: mpsc::UnboundedReceiver<Event>,
    stops: Vec<String>,
) -> Response {
    let (tx, sse_rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let mut consumer = Consumer::new(&tokenizer, rx, stops, reply.prompt_tokens);
        if reply.kind == Kind::Chat {
            let mut first = reply.chunk("", Value::Null, None);
            first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            if tx.send(send(first)).await.is_err() {
                return;
            }
        }
        let mut offset = 0;
        // Text released at the end (no token of its own) rides on the chunk with the finish reason,
        // so that every other chunk is exactly one token.
        let mut tail = String::new();
        loop {
            let out = tokio::select! {
                () = tx.closed() => return,
                out = consumer.next() => out,
            };
            let event = match out {
                None => break,
                Some(Out::Piece(text, token)) => {
                    let Some(t) = token else {
                        tail += &text;
                        continue;
                    };
                    let logprobs = reply.logprobs(&tokenizer, &[(t, offset)]);
                    offset += text.len();
                    send(reply.chunk(&text, logprobs, None))
                }
                Some(Out::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                }) => {
                    let last = reply.chunk(&tail, Value::Null, Some(finish));
                    if tx.send(send(last)).await.is_err() {
                        return;
                    }
                    if !reply.include_usage {
                        break;
                    }
                    let usage = api::usage(prompt_tokens, completion_tokens, cached_tokens);
                    send(reply.envelope(true, None, Some(usage)))
                }
                Some(Out::Error(e)) => send(e.body()),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let events = futures_util::stream::unfold(sse_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events).into_response()
}
