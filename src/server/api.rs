//! The OpenAI-compatible request and response shapes: parsing and validation of request bodies
//! (every field checked for type and range, errors naming the field), and the JSON of responses,
//! stream chunks and errors.

use crate::chat::ChatMessage;
use crate::engine::GeneratedToken;
use crate::sampler::SamplingParams;
use crate::tokenizer::Tokenizer;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 503 with `Retry-After`: the queue is full, or the server is loading or draining.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message).code("unavailable")
    }

    pub fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A request body: a JSON object whose fields are read one by one, each error naming its field.
pub struct Body(Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::bad("the request body must be a JSON object")),
            Err(e) => Err(ApiError::bad(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }

    /// Field `name`, `None` when absent or null; a value of the wrong type is a 400 naming it.
    pub fn get<T: DeserializeOwned>(&self, name: &'static str) -> Result<Option<T>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| ApiError::bad(format!("`{name}`: {e}")).param(name)),
        }
    }

    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A number field that must lie in `lo..=hi`.
    fn ranged(&self, name: &'static str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let v = self.get::<f64>(name)?;
        match v {
            Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::bad(format!(
                "`{name}` is {x}; it must be between {lo} and {hi}"
            ))
            .param(name)),
            _ => Ok(v),
        }
    }
}

/// Sampling and length settings common to both generation endpoints.
pub struct Generation {
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub top_logprobs: usize,
}

/// Reads the generation settings. `chat`: `logprobs` is a boolean with `top_logprobs` beside it
/// (chat), rather than the number of alternatives (legacy completions).
pub fn generation(body: &Body, chat: bool) -> Result<Generation, ApiError> {
    let max = match body.get::<i64>("max_completion_tokens")? {
        Some(v) => Some((v, "max_completion_tokens")),
        None => body.get::<i64>("max_tokens")?.map(|v| (v, "max_tokens")),
    };
    let max_tokens = match max {
        Some((v, name)) if v <= 0 => {
            return Err(
                ApiError::bad(format!("`{name}` is {v}; it must be at least 1")).param(name),
            );
        }
        Some((v, _)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
        None => None,
    };
    if let Some(n) = body.get::<i64>("n")?
        && n != 1
    {
        return Err(
            ApiError::bad(format!("`n` is {n}; tern generates one choice (n = 1)")).param("n"),
        );
    }
    let mut sampling = SamplingParams {
        seed: match body.get::<u64>("seed")? {
            Some(seed) => seed,
            None => clock_seed(),
        },
        ..SamplingParams::default()
    };
    if let Some(t) = body.ranged("temperature", 0.0, 100.0)? {
        sampling.temperature = t as f32;
    }
    if let Some(p) = body.ranged("top_p", 0.0, 1.0)? {
        sampling.top_p = p as f32;
    }
    if let Some(p) = body.ranged("min_p", 0.0, 1.0)? {
        sampling.min_p = p as f32;
    }
    if let Some(k) = body.get::<i64>("top_k")? {
        // llama-server's convention: 0 or less turns top-k off.
        sampling.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(p) = body.ranged("frequency_penalty", -2.0, 2.0)? {
        sampling.frequency_penalty = p as f32;
    }
    if let Some(p) = body.ranged("presence_penalty", -2.0, 2.0)? {
        sampling.presence_penalty = p as f32;
    }
    if let Some(p) = body.ranged("repetition_penalty", 0.0, 100.0)? {
        if p == 0.0 {
            return Err(
                ApiError::bad("`repetition_penalty` must be positive").param("repetition_penalty")
            );
        }
        sampling.repeat_penalty = p as f32;
    }
    let stops = match body.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => body.get::<Vec<String>>("stop")?.unwrap_or_default(),
    };
    let (logprobs, top_logprobs) = if chat {
        let on = body.get::<bool>("logprobs")?.unwrap_or(false);
        let top = body.ranged("top_logprobs", 0.0, MAX_TOP_LOGPROBS as f64)?;
        if top.is_some() && !on {
            return Err(
                ApiError::bad("`top_logprobs` needs `logprobs: true`").param("top_logprobs")
            );
        }
        (on, top.unwrap_or(0.0) as usize)
    } else {
        match body.ranged("logprobs", 0.0, MAX_TOP_LOGPROBS as f64)? {
            Some(k) => (true, k as usize),
            None => (false, 0),
        }
    };
    let stream = body.get::<bool>("stream")?.unwrap_or(false);
    let include_usage = match body.raw("stream_options") {
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(
                    ApiError::bad("`stream_options.include_usage` must be a boolean")
                        .param("stream_options"),
                );
            }
        },
        Some(_) => {
            return Err(ApiError::bad("`stream_options` must be an object").param("stream_options"));
        }
        None => false,
    };
    Ok(Generation {
        max_tokens,
        sampling,
        stops,
        stream,
        include_usage,
        logprobs,
        top_logprobs,
    })
}

/// A seed from the clock, for requests that give none (as `tern run` without `--seed`).
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The messages of a chat request: `role` and `content` (a string, or an array of text parts).
pub fn messages(body: &Body) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(list) = body.raw("messages") else {
        return Err(ApiError::bad("`messages` is required").param("messages"));
    };
    let Value::Array(list) = list else {
        return Err(ApiError::bad("`messages` must be an array").param("messages"));
    };
    if list.is_empty() {
        return Err(ApiError::bad("`messages` is empty").param("messages"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let bad =
                |what: &str| ApiError::bad(format!("`messages[{i}]`: {what}")).param("messages");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`role` must be a string"))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(bad("only text content parts are supported")),
                        },
                    )
                    .collect::<Result<String, _>>()?,
                None | Some(Value::Null) => String::new(),
                Some(_) => return Err(bad("`content` must be a string or an array of text parts")),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The prompt of a completion request: a string, a list of token ids, or a list of one string.
pub fn prompt_ids(body: &Body, tokenizer: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    let bad = |m: &str| ApiError::bad(m.to_string()).param("prompt");
    let encode = |text: &str| {
        tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::bad(format!("`prompt`: {e:#}")).param("prompt"))
    };
    match body.raw("prompt") {
        None => Err(bad("`prompt` is required")),
        Some(Value::String(s)) => encode(s),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => encode(s),
            _ if items.iter().all(Value::is_u64) => {
                let ids: Vec<u32> = items
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
                    .collect();
                check_ids(&ids, tokenizer.vocab_size(), "prompt")?;
                Ok(ids)
            }
            _ => Err(bad(
                "`prompt` must be a string, one string in a list, or a list of token ids (one prompt per request)",
            )),
        },
        Some(_) => Err(bad("`prompt` must be a string or a list of token ids")),
    }
}

/// Every id must be in the vocabulary.
pub fn check_ids(ids: &[u32], vocab: usize, param: &'static str) -> Result<(), ApiError> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(ApiError::bad(format!(
            "`{param}`: token id {id} is outside the vocabulary of {vocab}"
        ))
        .param(param)),
        None => Ok(()),
    }
}

/// The logprobs of one token in the legacy completions shape (one element of each list).
pub fn completion_logprobs(tokenizer: &Tokenizer, tokens: &[(GeneratedToken, usize)]) -> Value {
    let text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    json!({
        "tokens": tokens.iter().map(|(t, _)| text(t.id)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|(t, _)| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|(t, _)| {
            t.top.iter().map(|&(id, lp)| (text(id), json!(lp))).collect::<Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": tokens.iter().map(|(_, offset)| offset).collect::<Vec<_>>(),
    })
}

/// The logprobs of tokens in the chat shape: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[(GeneratedToken, usize)]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let text = tokenizer.decode(&[id], false).unwrap_or_default();
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|(t, _)| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// OpenAI's `usage`; `cached`: prompt tokens taken from the prefix cache.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}
