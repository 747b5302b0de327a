//! OpenAI-compatible HTTP server: `/v1/completions`, `/v1/chat/completions` (JSON or SSE
//! streaming), `/v1/models`, `/health`.
//!
//! One thread owns the model and runs one generation at a time. A handler checks the request's
//! cheap fields, then takes an admission slot, and only then renders the chat and tokenizes
//! (on a blocking thread, off the runtime) and queues: a request that finds every slot taken
//! is answered 429 at once, before any work on its text. A request holds its slot until its
//! response is fully sent (or the client goes away).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use holdfast_model::Tokenizer;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::model::PromptRule;
use crate::{Cache, Generation};
use crate::{ChatMessage, Completion, SamplingOptions, ServeError, ServedModel};

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Clients must send `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Requests admitted at once (running plus queued); more are refused with 429.
    pub max_pending: usize,
    /// Requests generated together, one batched forward per token.
    pub max_batch: usize,
}

/// What the model thread runs: a validated, tokenized request.
struct Job {
    prompt: Vec<u32>,
    sampling: SamplingOptions,
    /// Text is sent as it is made only to a stream; one answer waits for `Done` alone, and
    /// waking its handler for every token would take the cores from the forward.
    stream: bool,
    events: mpsc::UnboundedSender<JobEvent>,
}

enum JobEvent {
    Text(String),
    Done(Completion),
}

/// What handlers need to know about the model, shared with them.
struct AppState {
    model_id: String,
    tokenizer: Arc<Tokenizer>,
    prompt_rule: PromptRule,
    chat_template: Option<String>,
    stop_tokens: Vec<u32>,
    context: usize,
    jobs: mpsc::UnboundedSender<Job>,
    options: ServerOptions,
    pending: Arc<AtomicUsize>,
    /// Written by the model thread, read by `/health`.
    largest_batch: Arc<AtomicUsize>,
}

/// A held admission slot; released on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a slot when fewer than `max` are held.
fn admit(pending: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
    pending
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(pending.clone()))
}

/// An OpenAI-style error: status and `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: &'static str,
    ) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            code,
            param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

/// `stop` is a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt` is a string or a list holding one string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// Fields shared by both endpoints; others that OpenAI clients send are ignored.
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not in OpenAI's API; accepted as llama.cpp's and vLLM's servers do.
    top_k: Option<usize>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    seed: Option<u64>,
    n: Option<usize>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

/// Default `max_tokens` of `/v1/completions`, as in OpenAI's API.
const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// Checks the fields that cost nothing to check, before the request is admitted.
fn check_fields(state: &AppState, common: &Common) -> Result<(), ApiError> {
    if common.model != state.model_id {
        return Err(ApiError::invalid(
            format!(
                "model '{}' is not served here (available: '{}')",
                common.model, state.model_id
            ),
            Some("model"),
            "model_not_found",
        ));
    }
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "only n = 1 is supported",
            Some("n"),
            "invalid_value",
        ));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature {temperature} is outside [0, 2]"),
            Some("temperature"),
            "invalid_value",
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p {top_p} is outside (0, 1]"),
            Some("top_p"),
            "invalid_value",
        ));
    }
    if stops(common).len() > 4 || stops(common).iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop takes up to 4 non-empty strings",
            Some("stop"),
            "invalid_value",
        ));
    }
    Ok(())
}

fn stops(common: &Common) -> Vec<String> {
    match &common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    }
}

/// What an admitted request asks for: a completion's prompt, or a chat to render.
enum Input {
    Prompt(String),
    Chat(Vec<ChatMessage>),
}

/// Renders and tokenizes an admitted request (checked by [`check_fields`]) into a job's prompt
/// and sampling options.
fn prepare(
    state: &AppState,
    input: Input,
    common: &Common,
    default_max_tokens: Option<usize>,
) -> Result<(Vec<u32>, SamplingOptions), ApiError> {
    let (rule, tokenizer) = (&state.prompt_rule, &state.tokenizer);
    let encoded = match input {
        Input::Prompt(text) => rule.encode(tokenizer, &text).map_err(ServeError::from),
        Input::Chat(messages) => {
            rule.chat_ids(tokenizer, state.chat_template.as_deref(), &messages)
        }
    };
    let prompt = encoded.map_err(|e| {
        // A template that fails names the messages; a text that cannot be encoded, the prompt.
        let param = match e {
            ServeError::Template(_) => "messages",
            _ => "prompt",
        };
        ApiError::invalid(e.to_string(), Some(param), "invalid_value")
    })?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "the prompt is empty",
            Some("prompt"),
            "invalid_value",
        ));
    }
    if prompt.len() >= state.context {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {} tokens; this model's context is {} tokens",
                prompt.len(),
                state.context
            ),
            Some("prompt"),
            "context_length_exceeded",
        ));
    }
    let room = state.context - prompt.len();
    let max_tokens = common
        .max_tokens
        .or(common.max_completion_tokens)
        .or(default_max_tokens)
        .unwrap_or(room);
    if max_tokens == 0 || max_tokens > room {
        return Err(ApiError::invalid(
            format!(
                "max_tokens {max_tokens} is not in 1..={room}: the prompt is {} tokens and the context {}",
                prompt.len(),
                state.context
            ),
            Some("max_tokens"),
            "invalid_value",
        ));
    }
    let sampling = SamplingOptions {
        temperature: common.temperature.unwrap_or(1.0),
        top_k: common.top_k.unwrap_or(0),
        top_p: common.top_p.unwrap_or(1.0),
        max_new_tokens: max_tokens,
        seed: request_seed(common.seed),
        stop: stops(common),
        stop_tokens: state.stop_tokens.clone(),
    };
    Ok((prompt, sampling))
}

/// The sampling seed of a request: its own, or a fresh one, so that sampled requests without
/// one do not all return the same text.
fn request_seed(given: Option<u64>) -> u64 {
    given.unwrap_or_else(rand::random)
}

fn bad_json(rejection: JsonRejection) -> ApiError {
    // A body past the size limit is not malformed: it is too large (413), and says so.
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: rejection.body_text(),
            code: "request_too_large",
            param: None,
        };
    }
    ApiError::invalid(rejection.body_text(), None, "invalid_json")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which endpoint a response is for: they differ only in JSON shape.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }

    /// The `object` of a whole response, or of one streamed chunk.
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(bad_json)?;
    let text = match &req.prompt {
        Prompt::One(s) => s.clone(),
        Prompt::Many(v) if v.len() == 1 => v[0].clone(),
        Prompt::Many(_) => {
            return Err(ApiError::invalid(
                "prompt must be a string or a list of one string",
                Some("prompt"),
                "invalid_value",
            ));
        }
    };
    let default = Some(COMPLETION_DEFAULT_MAX_TOKENS);
    respond(
        state,
        Kind::Completion,
        Input::Prompt(text),
        req.common,
        default,
    )
    .await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(bad_json)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages is empty",
            Some("messages"),
            "invalid_value",
        ));
    }
    respond(
        state,
        Kind::Chat,
        Input::Chat(req.messages),
        req.common,
        None,
    )
    .await
}

/// Checks the request's cheap fields, takes an admission slot, prepares the job off the
/// runtime and queues it: the slot, the prompt's length and the job's events.
async fn admit_and_queue(
    state: &Arc<AppState>,
    input: Input,
    common: Common,
    default_max_tokens: Option<usize>,
) -> Result<(Slot, usize, mpsc::UnboundedReceiver<JobEvent>), ApiError> {
    check_fields(state, &common)?;
    let slot = admit(&state.pending, state.options.max_pending).ok_or(ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "the server is busy ({} requests admitted); retry later",
            state.options.max_pending
        ),
        code: "queue_full",
        param: None,
    })?;
    let shared = state.clone();
    let stream = common.stream;
    let (prompt, sampling) =
        tokio::task::spawn_blocking(move || prepare(&shared, input, &common, default_max_tokens))
            .await
            .map_err(|_| unavailable())??;
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        sampling,
        stream,
        events: tx,
    };
    state.jobs.send(job).map_err(|_| unavailable())?;
    Ok((slot, prompt_tokens, rx))
}

/// Checks, admits, prepares and queues a job, then answers with one JSON body or an SSE
/// stream.
async fn respond(
    state: Arc<AppState>,
    kind: Kind,
    input: Input,
    common: Common,
    default_max_tokens: Option<usize>,
) -> Result<Response, ApiError> {
    let stream = common.stream;
    let (slot, prompt_tokens, mut rx) =
        admit_and_queue(&state, input, common, default_max_tokens).await?;
    let id = format!("{}-{:x}", kind.id_prefix(), rand::random::<u64>());
    let created = now_secs();
    let model = state.model_id.clone();

    if !stream {
        let mut done = None;
        while let Some(ev) = rx.recv().await {
            if let JobEvent::Done(c) = ev {
                done = Some(c);
            }
        }
        let c = done.ok_or_else(unavailable)?;
        drop(slot);
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": c.tokens.len(),
            "total_tokens": prompt_tokens + c.tokens.len(),
        });
        let choice = match kind {
            Kind::Completion => json!({
                "index": 0, "text": c.text, "logprobs": null,
                "finish_reason": c.finish_reason.as_str(),
            }),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason.as_str(),
            }),
        };
        let object = kind.object(false);
        return Ok(Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage,
        }))
        .into_response());
    }

    let chunk = move |delta: Option<&str>, finish: Option<&str>| -> Event {
        let choice = match kind {
            Kind::Completion => json!({
                "index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Kind::Chat => {
                let delta = match delta {
                    Some(t) => json!({"role": "assistant", "content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
        };
        let object = kind.object(true);
        Event::default().data(
            json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": [choice],
            })
            .to_string(),
        )
    };
    // The slot travels with the stream: it is released when the last event is sent or the
    // client disconnects (the stream is dropped; the model thread then sees a closed channel
    // and stops generating).
    let events = UnboundedReceiverStream::new(rx)
        .map(move |ev| {
            let _held = &slot;
            match ev {
                JobEvent::Text(t) => chunk(Some(&t), None),
                JobEvent::Done(c) => chunk(None, Some(c.finish_reason.as_str())),
            }
        })
        .chain(tokio_stream::once(Event::default().data("[DONE]")))
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(events).into_response())
}

fn unavailable() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the model is not running".into(),
        code: "model_unavailable",
        param: None,
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.jobs.is_closed() {
        return unavailable().into_response();
    }
    Json(json!({
        "status": "ok",
        "model": state.model_id,
        "pending": state.pending.load(Ordering::SeqCst),
        "max_pending": state.options.max_pending,
        "max_batch": state.options.max_batch,
        // The most requests one forward has carried so far.
        "largest_batch": state.largest_batch.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id, "object": "model", "created": 0, "owned_by": "holdfast",
            "context_length": state.context,
        }],
    }))
}

/// The largest request body read (axum's default, stated).
const MAX_BODY_BYTES: usize = 2 << 20;

/// A body declared larger than the limit is refused before any of it is read.
async fn refuse_oversized(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > MAX_BODY_BYTES as u64) {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is {n} bytes; the limit is {MAX_BODY_BYTES}"),
            code: "request_too_large",
            param: None,
        }
        .into_response();
    }
    next.run(req).await
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compared as BLAKE3 digests, whose equality is constant-time: how long the check
        // takes says nothing about how much of a guessed key was right.
        let matches =
            given.is_some_and(|g| blake3::hash(g.as_bytes()) == blake3::hash(key.as_bytes()));
        if !matches {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
                code: "invalid_api_key",
                param: None,
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        code: "not_found",
        param: None,
    }
}

/// A request being generated: its job, its sampling state and its KV cache.
struct Running<'a> {
    job: Job,
    generation: Generation<'a>,
    cache: Cache,
}

/// The model thread: takes up to `batch` requests at once and steps them all through one
/// forward per token (continuous batching: a request joins at the next step after it arrives
/// and leaves when it ends). Returns when the queue closes and the last request is done.
fn run_model(
    model: &ServedModel,
    mut queue: mpsc::UnboundedReceiver<Job>,
    batch: usize,
    largest_batch: &AtomicUsize,
) {
    let mut running: Vec<Running> = Vec::new();
    let start = |job: Job| Running {
        generation: Generation::new(model, &job.prompt, &job.sampling),
        cache: model.engine.new_cache(),
        job,
    };
    loop {
        if running.is_empty() {
            match queue.blocking_recv() {
                Some(job) => running.push(start(job)),
                None => return,
            }
        }
        while running.len() < batch {
            match queue.try_recv() {
                Ok(job) => running.push(start(job)),
                Err(_) => break,
            }
        }
        // A client that left costs nothing more.
        running.retain(|r| !r.job.events.is_closed());
        largest_batch.fetch_max(running.len(), Ordering::Relaxed);
        // On a worker of the compute pool, as the forward itself runs: the sampling after it
        // is then split from inside the pool.
        rayon::scope(|_| step(model, &mut running));
        running.retain(|r| match r.generation.finished() {
            Some(c) => {
                let _ = r.job.events.send(JobEvent::Done(c));
                false
            }
            None => true,
        });
    }
}

/// One forward for every running request, and each one's next token.
fn step(model: &ServedModel, running: &mut Vec<Running>) {
    let inputs: Vec<Vec<u32>> = running
        .iter()
        .map(|r| r.generation.input().to_vec())
        .collect();
    let mut steps: Vec<(&mut Cache, &[u32])> = running
        .iter_mut()
        .zip(&inputs)
        .map(|(r, input)| (&mut r.cache, &input[..]))
        .collect();
    match model.engine.next_logits_batch(&mut steps) {
        Ok(logits) => {
            // Each request samples and detokenizes on its own: split over the compute pool,
            // which would otherwise wait for it.
            running.par_iter_mut().zip(&logits).for_each(|(r, logits)| {
                let (events, stream) = (r.job.events.clone(), r.job.stream);
                // False cancels: the client is gone.
                r.generation.advance(logits, &mut |t: &str| {
                    if stream {
                        events.send(JobEvent::Text(t.to_string())).is_ok()
                    } else {
                        !events.is_closed()
                    }
                });
            });
        }
        Err(e) => {
            // The requests are dropped unanswered: each handler answers 503.
            tracing::error!("forward failed for {} requests: {e}", running.len());
            running.clear();
        }
    }
}

/// Starts the model thread and returns the router. The thread ends when the router (and so
/// every job sender) is dropped.
pub fn router(model: ServedModel, options: ServerOptions) -> Router {
    let (jobs, queue) = mpsc::unbounded_channel::<Job>();
    let batch = options.max_batch.max(1);
    let state = Arc::new(AppState {
        model_id: model.id.clone(),
        tokenizer: model.tokenizer.clone(),
        prompt_rule: model.prompt_rule.clone(),
        chat_template: model.chat_template.clone(),
        stop_tokens: model.stop_tokens.clone(),
        context: model.context(),
        jobs,
        options,
        pending: Arc::new(AtomicUsize::new(0)),
        largest_batch: Arc::new(AtomicUsize::new(0)),
    });
    let largest_batch = state.largest_batch.clone();
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || run_model(&model, queue, batch, &largest_batch))
        .expect("spawn the model thread");
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn(refuse_oversized))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until Ctrl-C or SIGTERM, finishing requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: ServedModel,
    options: ServerOptions,
) -> std::io::Result<()> {
    axum::serve(listener, router(model, options))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;

    #[test]
    fn a_request_without_a_seed_gets_a_fresh_one() {
        assert_eq!(request_seed(Some(7)), 7);
        let seeds: std::collections::HashSet<u64> = (0..8).map(|_| request_seed(None)).collect();
        assert_eq!(seeds.len(), 8, "not one fixed default");
    }

    #[test]
    fn admission_is_bounded_and_slots_are_released_on_drop() {
        let pending = Arc::new(AtomicUsize::new(0));
        let a = admit(&pending, 2).unwrap();
        let b = admit(&pending, 2).unwrap();
        assert!(admit(&pending, 2).is_none());
        drop(a);
        let c = admit(&pending, 2).unwrap();
        drop((b, c));
        assert_eq!(pending.load(Ordering::SeqCst), 0);
    }

    /// A server state whose every admission slot is taken, with a chat template that fails.
    fn full_state() -> Arc<AppState> {
        let (jobs, _) = mpsc::unbounded_channel();
        Arc::new(AppState {
            model_id: "m".into(),
            tokenizer: Arc::new(Tokenizer::Bytes),
            prompt_rule: PromptRule::default(),
            chat_template: Some("{{ raise_exception('never rendered') }}".into()),
            stop_tokens: Vec::new(),
            context: 64,
            jobs,
            options: ServerOptions {
                api_key: None,
                max_pending: 1,
                max_batch: 1,
            },
            pending: Arc::new(AtomicUsize::new(1)),
            largest_batch: Arc::new(AtomicUsize::new(0)),
        })
    }

    #[tokio::test]
    async fn a_full_server_refuses_before_rendering_or_tokenizing() {
        // Each would be a 400 once rendered or tokenized; while full, none is looked at.
        let empty: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": ""})).unwrap();
        let err = completions(State(full_state()), Ok(Json(empty)))
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::TOO_MANY_REQUESTS, "queue_full")
        );
        let chat: ChatRequest = serde_json::from_value(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        let err = chat_completions(State(full_state()), Ok(Json(chat)))
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        // A field that costs nothing to check is still checked first.
        let wrong: CompletionRequest =
            serde_json::from_value(json!({"model": "other", "prompt": "x"})).unwrap();
        let err = completions(State(full_state()), Ok(Json(wrong)))
            .await
            .unwrap_err();
        assert_eq!(err.code, "model_not_found");
    }

    /// A server state with room to admit, whose model thread is gone (every admitted request
    /// ends in 503 after it is prepared).
    fn open_state() -> Arc<AppState> {
        let (jobs, _) = mpsc::unbounded_channel();
        Arc::new(AppState {
            model_id: "m".into(),
            tokenizer: Arc::new(Tokenizer::Bytes),
            prompt_rule: PromptRule {
                bos: Some(1),
                ..PromptRule::default()
            },
            chat_template: None,
            stop_tokens: vec![0],
            context: 64,
            jobs,
            options: ServerOptions {
                api_key: None,
                max_pending: 16,
                max_batch: 16,
            },
            pending: Arc::new(AtomicUsize::new(0)),
            largest_batch: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            Just(json!(1e300)),
            ".{0,24}".prop_map(Value::from),
            proptest::collection::vec(".{0,6}", 0..6).prop_map(|v| json!(v)),
        ]
    }

    /// A field that is absent, of its own type (edge values included), or anything at all.
    fn field(kind: &'static str) -> impl proptest::strategy::Strategy<Value = Option<Value>> {
        use proptest::prelude::*;
        let typed = match kind {
            "count" => prop_oneof![
                (0u64..80).prop_map(Value::from),
                Just(json!(u64::MAX)),
                Just(json!(0))
            ]
            .boxed(),
            "float" => prop_oneof![
                6 => (0.01f64..1.0).prop_map(Value::from),
                1 => Just(json!(-1.0)),
                1 => Just(json!(1e300))
            ]
            .boxed(),
            "stop" => prop_oneof![
                ".{0,4}".prop_map(Value::from),
                proptest::collection::vec(".{0,4}", 0..6).prop_map(|v| json!(v))
            ]
            .boxed(),
            "bool" => any::<bool>().prop_map(Value::from).boxed(),
            "one" => Just(json!(1)).boxed(),
            _ => any::<u64>().prop_map(Value::from).boxed(),
        };
        prop_oneof![6 => Just(None), 6 => typed.prop_map(Some), 1 => any_json().prop_map(Some)]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any request body that deserializes is answered — a completion or an OpenAI-shaped
        /// error — and none panics a handler.
        #[test]
        fn fuzz_any_request_body_is_answered(
            raw in ".{0,64}",
            model in proptest::prop_oneof![7 => proptest::prelude::Just("m".to_string()), 1 => ".{0,3}"],
            prompt in proptest::prop_oneof![3 => ".{0,40}".prop_map(Value::from), 1 => any_json()],
            fields in (
                field("count"), field("count"), field("float"), field("float"), field("count"),
                field("stop"), field("seed"), field("one"), field("bool"),
            ),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(req) = serde_json::from_str::<CompletionRequest>(&raw) {
                    let _ = completions(State(open_state()), Ok(Json(req))).await;
                }
                let keys = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                    "stop", "seed", "n", "stream"];
                let (a, b, c, d, e, f, g, h, i) = fields;
                let mut body = json!({"model": model, "prompt": prompt});
                for (k, v) in keys.iter().zip([a, b, c, d, e, f, g, h, i]) {
                    if let Some(v) = v {
                        body[*k] = v;
                    }
                }
                if let Ok(req) = serde_json::from_value::<CompletionRequest>(body.clone()) {
                    let _ = completions(State(open_state()), Ok(Json(req))).await;
                }
                body["messages"] = json!([{"role": "user", "content": body["prompt"].clone()}]);
                if let Ok(req) = serde_json::from_value::<ChatRequest>(body) {
                    let _ = chat_completions(State(open_state()), Ok(Json(req))).await;
                }
            });
        }
    }
}
