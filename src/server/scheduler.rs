//! The scheduler: one thread that owns the [`Engine`] (backends are not shared across threads) and
//! runs every request through it with continuous batching.
//!
//! Each step:
//! 1. takes new jobs from the channel (blocking only when there is nothing to do) and drops those
//!    whose client has gone (its event receiver is closed), freeing their KV slots;
//! 2. gives free KV slots to waiting jobs, oldest first, while the KV pool has the pages each will
//!    need at most (its prompt plus `max_tokens`, within the context) besides those promised to
//!    the running ones; the oldest job that does not fit waits, and the ones behind it too; with
//!    the prefix cache on, a new sequence starts with the cached pages of the longest registered
//!    prefix of its prompt ([`Engine::new_sequence_with_prefix`]) and feeds only the rest;
//! 3. runs one forward pass holding the last sampled token of every decoding sequence (one row
//!    each) and at most [`PREFILL_CHUNK`] prompt tokens of the sequences still in prefill, oldest
//!    first (chunked prefill: a long prompt never stalls the running streams for more than a
//!    chunk; the weights are read once for both kinds of rows), or, when every prompt in prefill
//!    finishes within that chunk, those prompts alone ([`plan`]: a short request's first token
//!    does not wait for the running streams' rows);
//!    With the output head chosen per step, the pass takes the 8-bit copy when every row it
//!    samples reads only its top [`Q8_EXACT_TOP_K`] logits (no log-probabilities, greedy or top-k
//!    ≤ 64 without penalties: the same draws as the full head), keeping exact the most any of
//!    those rows reads (1 for greedy, k for top-k), the full head otherwise;
//! 4. samples every decode row, and the first token of every prompt completed in that pass, with
//!    the sequence's own sampler, so a seed gives the same text alone or batched;
//! 5. retires finished sequences and publishes the gauges.
//!
//! Invariants: a job holds a slot from admission until it finishes, fails or is cancelled, and then
//! releases it (and its pages) in the same step; the pages promised to running jobs never exceed
//! the pool, so a running sequence never runs out of pages (pages are still taken only as tokens
//! arrive, so the pool's used pages follow the tokens held); every job gets exactly one terminal
//! event ([`Event::Done`] or [`Event::Error`]) unless its receiver is gone. An engine error fails only the sequences of that
//! batch. On [`Command::Shutdown`] waiting jobs are refused, running ones continue until they finish
//! or the grace period ends, then are cancelled, and the thread returns.

use super::metrics::Metrics;
use crate::backend::{LmHead, Q8_EXACT_TOP_K};
use crate::engine::{Engine, Feed, FinishReason, GeneratedToken};
use crate::kv_cache::SequenceId;
use crate::sampler::{Sampler, SamplingParams, logprob_of, top_logprobs};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens fed per step, over all sequences in prefill.
pub const PREFILL_CHUNK: usize = 128;

/// What a request asks the scheduler to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Ids that end generation (reported, not fed back).
    pub stop_ids: Vec<u32>,
    /// Whether to compute each token's log-probability.
    pub logprobs: bool,
    /// Alternatives reported per token.
    pub top_logprobs: usize,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// What the scheduler tells a request.
#[derive(Debug)]
pub enum Event {
    /// The job holds a KV slot; `cached_tokens` of its prompt came from the prefix cache.
    Started {
        cached_tokens: usize,
    },
    Token(GeneratedToken),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed; the message says why. `retry`: the server is shutting down (503).
    Error {
        message: String,
        retry: bool,
    },
}

pub enum Command {
    Generate(Box<Job>),
    /// Stop admitting; cancel what is still running after the grace period.
    Shutdown {
        grace: Duration,
    },
}

/// A job holding a KV slot.
struct Running {
    job: Box<Job>,
    seq: SequenceId,
    sampler: Sampler,
    /// Prompt and generated ids (the penalties' history).
    history: Vec<u32>,
    /// Prompt tokens fed so far.
    fed: usize,
    generated: usize,
    /// The sampled token still to be fed (decode phase).
    pending: Option<u32>,
    last_token_at: Option<Instant>,
    /// Why the sequence ended, once it has.
    finish: Option<FinishReason>,
    /// KV pages the sequence may take at most (see [`Scheduler::pages_needed`]).
    pages: usize,
}

pub struct Scheduler {
    engine: Engine,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Box<Job>>,
    running: Vec<Running>,
    /// Set by [`Command::Shutdown`]: when running sequences are cancelled.
    deadline: Option<Instant>,
    /// The head the engine evaluates now, when it is chosen per step (`None`: fixed at load).
    head: Option<LmHead>,
}

impl Scheduler {
    /// `head_per_step`: choose the output head per step where the backend has an 8-bit copy.
    pub fn new(mut engine: Engine, metrics: Arc<Metrics>, head_per_step: bool) -> Self {
        let q8 = LmHead::Q8 {
            top: Q8_EXACT_TOP_K,
        };
        let head = (head_per_step && engine.set_lm_head(q8).is_ok()).then(|| {
            tracing::info!(
                "output head chosen per step: the 8-bit copy when every sampled row reads only \
                 its top {Q8_EXACT_TOP_K} logits (those it reads kept exact), else the full head"
            );
            q8
        });
        let s = Self {
            engine,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            deadline: None,
            head,
        };
        s.publish();
        s
    }

    /// Runs until shutdown (or until every sender of `commands` is gone) and nothing is left.
    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            let idle = self.waiting.is_empty() && self.running.is_empty();
            if idle && self.deadline.is_some() {
                return;
            }
            let first = if idle {
                commands.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                commands.try_recv()
            };
            match first {
                Ok(c) => self.command(c),
                Err(TryRecvError::Disconnected) if idle => return,
                Err(_) => {}
            }
            while let Ok(c) = commands.try_recv() {
                self.command(c);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                for r in std::mem::take(&mut self.running) {
                    self.finish(r, FinishReason::Cancelled);
                }
            }
            self.drop_abandoned();
            self.admit();
            self.step();
            self.publish();
            if self.waiting.is_empty() && self.running.is_empty() && self.deadline.is_some() {
                // Wait briefly for the last commands of a draining server, then stop.
                match commands.recv_timeout(Duration::from_millis(10)) {
                    Ok(c) => self.command(c),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Generate(job) if self.deadline.is_some() => {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                refuse(&job, "the server is shutting down");
            }
            Command::Generate(job) => self.waiting.push_back(job),
            Command::Shutdown { grace } => {
                self.deadline = Some(Instant::now() + grace);
                for job in std::mem::take(&mut self.waiting) {
                    self.metrics.queue_depth.fetch_sub(1, Relaxed);
                    refuse(&job, "the server is shutting down");
                }
            }
        }
    }

    /// Forgets jobs whose client disconnected, freeing their slots.
    fn drop_abandoned(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = before - self.waiting.len();
        self.metrics.queue_depth.fetch_sub(gone as u64, Relaxed);
        self.metrics.cancelled.fetch_add(gone as u64, Relaxed);
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| r.job.events.is_closed());
        self.running = kept;
        for r in gone {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            self.engine.release(r.seq);
        }
    }

    /// KV pages `job` may hold at most: its prompt and `max_tokens` within the context.
    fn pages_needed(&self, job: &Job) -> usize {
        let positions = (job.prompt.len() + job.max_tokens).min(self.engine.context());
        self.engine.kv().pages_for(positions)
    }

    fn admit(&mut self) {
        let promised: usize = self.running.iter().map(|r| r.pages).sum();
        let mut available = self.engine.kv().max_pages().saturating_sub(promised);
        while self.engine.slots_in_use() < self.engine.slots() {
            let Some(pages) = self.waiting.front().map(|job| self.pages_needed(job)) else {
                break;
            };
            if pages > available {
                break; // oldest first: it waits for pages, and the ones behind it too
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            available -= pages;
            self.metrics.queue_depth.fetch_sub(1, Relaxed);
            match self.engine.new_sequence_with_prefix(&job.prompt) {
                Ok((seq, cached)) => {
                    let m = &self.metrics;
                    m.prompt_tokens_cached.fetch_add(cached as u64, Relaxed);
                    let _ = job.events.send(Event::Started {
                        cached_tokens: cached,
                    });
                    self.running.push(Running {
                        pages,
                        seq,
                        sampler: Sampler::new(job.sampling),
                        history: job.prompt.clone(),
                        fed: cached,
                        generated: 0,
                        pending: None,
                        last_token_at: None,
                        finish: None,
                        job,
                    })
                }
                Err(e) => fail(&job, &e),
            }
        }
    }

    /// One forward pass over the rows [`plan`] picks from the running sequences. Every decode row
    /// and every prompt that completes samples its next token from the same batch.
    fn step(&mut self) {
        let ready: Vec<Ready> = (self.running.iter())
            .map(|r| match r.pending {
                Some(_) => Ready::Decode,
                None => Ready::Prompt(r.job.prompt.len() - r.fed),
            })
            .collect();
        let plan = plan(&ready);
        if plan.is_empty() {
            return;
        }
        if let Some(current) = self.head {
            // The most of the largest logits a row sampled in this pass reads (`None`: all).
            let top = plan.iter().filter(|p| p.2).try_fold(1, |top, &(i, _, _)| {
                let job = &self.running[i].job;
                let whole = job.logprobs || job.top_logprobs > 0;
                let read = job.sampling.top_read().filter(|_| !whole)?;
                Some(top.max(read))
            });
            let wanted = match top.filter(|&n| n <= Q8_EXACT_TOP_K) {
                Some(top) => LmHead::Q8 { top },
                None => LmHead::Full,
            };
            if wanted != current && self.engine.set_lm_head(wanted).is_ok() {
                self.head = Some(wanted);
            }
        }
        let items: Vec<Feed<'_>> = plan
            .iter()
            .map(|&(i, n, logits)| {
                let r = &self.running[i];
                let tokens = match &r.pending {
                    Some(t) => std::slice::from_ref(t),
                    None => &r.job.prompt[r.fed..r.fed + n],
                };
                Feed {
                    seq: r.seq,
                    tokens,
                    logits,
                }
            })
            .collect();
        let started = Instant::now();
        let result = self.engine.feed_batch(&items);
        tracing::debug!(
            "step: {} rows ({} sequences), {:.1} ms",
            items.iter().map(|f| f.tokens.len()).sum::<usize>(),
            items.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        drop(items);
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                // Indices shift as sequences are removed: remove from the back.
                for &(i, _, _) in plan.iter().rev() {
                    let r = self.running.remove(i);
                    fail(&r.job, &e);
                    self.engine.release(r.seq);
                }
                return;
            }
        };
        let vocab = self.engine.config().vocab;
        let mut rows = logits.chunks_exact(vocab);
        for &(i, n, samples) in &plan {
            let r = &mut self.running[i];
            match r.pending.take() {
                Some(token) => r.history.push(token),
                None => {
                    r.fed += n;
                    self.metrics.prompt_tokens.fetch_add(n as u64, Relaxed);
                }
            }
            if samples && let Some(row) = rows.next() {
                self.sample(i, row);
            }
        }
        self.retire();
    }

    /// Samples the next token of running sequence `i` from its `logits`, sends it, and leaves it
    /// pending for the next decode step or records why the sequence is finished.
    fn sample(&mut self, i: usize, logits: &[f32]) {
        let r = &mut self.running[i];
        let id = r.sampler.sample(logits, &r.history);
        let token = GeneratedToken {
            id,
            logprob: if r.job.logprobs {
                logprob_of(logits, id)
            } else {
                0.0
            },
            top: top_logprobs(logits, r.job.top_logprobs),
        };
        let now = Instant::now();
        match r.last_token_at {
            None => self.metrics.observe_ttft(now - r.job.arrived),
            Some(t) => self.metrics.observe_itl(now - t),
        }
        r.last_token_at = Some(now);
        r.generated += 1;
        self.metrics.generated_tokens.fetch_add(1, Relaxed);
        // A closed receiver is noticed (and the slot freed) by the next `drop_abandoned`.
        let _ = r.job.events.send(Event::Token(token));
        let full = self.engine.sequence_len(r.seq).unwrap_or(0) >= self.engine.context();
        r.finish = if r.job.stop_ids.contains(&id) {
            Some(FinishReason::Stop)
        } else if r.generated >= r.job.max_tokens {
            Some(FinishReason::Length)
        } else if full {
            Some(FinishReason::ContextFull)
        } else {
            r.pending = Some(id);
            None
        };
    }

    /// Finishes every sequence whose last token ended it.
    fn retire(&mut self) {
        let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| r.finish.is_some());
        self.running = kept;
        for r in done {
            let reason = r.finish.unwrap_or(FinishReason::Cancelled);
            self.finish(r, reason);
        }
    }

    fn finish(&mut self, r: Running, finish: FinishReason) {
        let _ = r.job.events.send(Event::Done {
            finish,
            prompt_tokens: r.job.prompt.len(),
            completion_tokens: r.generated,
        });
        self.engine.release(r.seq);
    }

    fn publish(&self) {
        let used = self.engine.slots_in_use();
        let m = &self.metrics;
        m.active.store(self.running.len() as u64, Relaxed);
        m.slots_used.store(used as u64, Relaxed);
        m.slots_free
            .store((self.engine.slots() - used) as u64, Relaxed);
        let kv = self.engine.kv();
        m.kv_pages_used.store(kv.pages_used() as u64, Relaxed);
        m.kv_pages_free.store(kv.pages_free() as u64, Relaxed);
        m.kv_pages_cached.store(kv.pages_cached() as u64, Relaxed);
    }
}

/// What a running sequence can feed in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ready {
    /// Its last sampled token (one decode row).
    Decode,
    /// This many prompt tokens still to feed (0: nothing to feed).
    Prompt(usize),
}

/// The rows of one step, as (running index, tokens fed, whether it samples), from what each
/// running sequence can feed: a decode row for each sequence with a token, and prompt chunks of
/// the sequences in prefill, at most [`PREFILL_CHUNK`] tokens in all, oldest first (chunked
/// prefill: a long prompt delays the running streams by at most a chunk per step). When every
/// prompt in prefill finishes within that budget, the step feeds those prompts alone: a short new
/// request's first token then waits for its own prompt only, not for a pass over every running
/// stream's row too (the time to first token under load stays near an idle server's), and the
/// running streams wait at most a chunk's pass, as with a chunk beside their rows.
fn plan(ready: &[Ready]) -> Vec<(usize, usize, bool)> {
    let waiting: usize = (ready.iter())
        .map(|r| match r {
            Ready::Prompt(n) => *n,
            Ready::Decode => 0,
        })
        .sum();
    let prompts_only = waiting > 0 && waiting <= PREFILL_CHUNK;
    let mut budget = PREFILL_CHUNK;
    let mut plan = Vec::new();
    for (i, r) in ready.iter().enumerate() {
        match *r {
            Ready::Decode if !prompts_only => plan.push((i, 1, true)),
            Ready::Prompt(left) if left > 0 && budget > 0 => {
                let take = budget.min(left);
                budget -= take;
                plan.push((i, take, take == left));
            }
            _ => {}
        }
    }
    plan
}

fn refuse(job: &Job, message: &str) {
    let _ = job.events.send(Event::Error {
        message: message.into(),
        retry: true,
    });
}

fn fail(job: &Job, e: &anyhow::Error) {
    tracing::warn!("request failed: {e:#}");
    let _ = job.events.send(Event::Error {
        message: format!("{e:#}"),
        retry: false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ready::{Decode, Prompt};

    #[test]
    fn short_prompts_get_a_step_of_their_own() {
        // Two streams decoding, a 30-token prompt just admitted: the prompt alone.
        assert_eq!(plan(&[Decode, Decode, Prompt(30)]), [(2, 30, true)]);
        // Prompts that finish within one chunk together, however many.
        assert_eq!(
            plan(&[Decode, Prompt(60), Prompt(68)]),
            [(1, 60, true), (2, 68, true)]
        );
        // Nothing in prefill: every decode row; a finished sequence feeds nothing.
        assert_eq!(
            plan(&[Decode, Prompt(0), Decode]),
            [(0, 1, true), (2, 1, true)]
        );
    }

    #[test]
    fn long_prompts_are_chunked_beside_the_decode_rows() {
        // More prompt than a chunk: the decode rows run, with a chunk of prompt, oldest first.
        assert_eq!(
            plan(&[Decode, Prompt(100), Prompt(100)]),
            [(0, 1, true), (1, 100, true), (2, 28, false)]
        );
        let long = PREFILL_CHUNK + 1;
        assert_eq!(
            plan(&[Prompt(long), Decode]),
            [(0, PREFILL_CHUNK, false), (1, 1, true)]
        );
        // The last chunk of a long prompt runs alone, like a short prompt.
        assert_eq!(plan(&[Prompt(1), Decode]), [(0, 1, true)]);
    }
}
