//! Aggregate generation throughput and time to first token of `tern serve`'s scheduler at 1, 4 and
//! 16 concurrent streams, on random weights of a published shape (no download, no HTTP).
//!
//! `cargo run --release --example serve_throughput -- [SHAPE] [THREADS] [PROMPT] [TOKENS]`
//! (defaults: 2b4t, 0 = one per core, 32 prompt tokens, 32 generated tokens per stream).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tern::backend::cpu::CpuBackend;
use tern::bench::ShapePreset;
use tern::engine::Engine;
use tern::sampler::SamplingParams;
use tern::server::metrics::Metrics;
use tern::server::scheduler::{Command, Event, Job, Scheduler};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.into());
    let shape = ShapePreset::parse(&arg(0, "2b4t"))?;
    let threads: usize = arg(1, "0").parse()?;
    let prompt_len: usize = arg(2, "32").parse()?;
    let tokens: usize = arg(3, "32").parse()?;
    let streams = [1usize, 4, 16];
    let vocab = shape.config().vocab as u32;
    let metrics = Arc::new(Metrics::default());
    let (commands, rx) = std::sync::mpsc::channel();
    let (ready, loaded) = std::sync::mpsc::channel();
    let scheduler_metrics = metrics.clone();
    // The engine is built on the thread that runs it: backends are not shared across threads.
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let source = shape.random_source(7);
        let backend = Box::new(CpuBackend::new(threads)?);
        let engine = Engine::new(&source, backend, prompt_len + tokens + 1, 16)?;
        let _ = ready.send(engine.backend_description());
        // The output head per step, as `tern serve` chooses it by default.
        Scheduler::new(engine, scheduler_metrics, true).run(rx);
        Ok(())
    });
    match loaded.recv() {
        Ok(description) => println!("{description}"),
        Err(_) => return thread.join().expect("scheduler thread panicked"),
    }
    println!("| streams | aggregate tok/s | mean TTFT (s) | max TTFT (s) |\n|---|---|---|---|");
    for n in streams {
        let started = Instant::now();
        let receivers: Vec<_> = (0..n)
            .map(|i| {
                let (events, rx) = tokio::sync::mpsc::unbounded_channel();
                let prompt = (0..prompt_len as u32)
                    .map(|t| (t * 31 + i as u32 * 7) % vocab)
                    .collect();
                let job = Job {
                    prompt,
                    max_tokens: tokens,
                    sampling: SamplingParams {
                        seed: i as u64,
                        ..SamplingParams::default()
                    },
                    stop_ids: vec![],
                    logprobs: false,
                    top_logprobs: 0,
                    arrived: Instant::now(),
                    events,
                };
                metrics
                    .queue_depth
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                commands.send(Command::Generate(Box::new(job))).unwrap();
                rx
            })
            .collect();
        // One reader per stream, so each first token is timed when it arrives.
        let readers: Vec<_> = receivers
            .into_iter()
            .map(|mut rx| {
                std::thread::spawn(move || -> anyhow::Result<(Duration, usize)> {
                    let (mut first, mut count) = (None, 0);
                    while let Some(e) = rx.blocking_recv() {
                        match e {
                            Event::Token(_) => {
                                first.get_or_insert_with(|| started.elapsed());
                                count += 1;
                            }
                            Event::Started { .. } => {}
                            Event::Done { .. } => break,
                            Event::Error { message, .. } => anyhow::bail!(message),
                        }
                    }
                    Ok((first.unwrap_or_default(), count))
                })
            })
            .collect();
        let mut ttft = Vec::new();
        let mut generated = 0;
        for r in readers {
            let (first, count) = r.join().expect("reader panicked")?;
            ttft.push(first);
            generated += count;
        }
        let secs = started.elapsed().as_secs_f64();
        let mean = ttft.iter().sum::<Duration>().as_secs_f64() / n as f64;
        let max = ttft.iter().max().unwrap().as_secs_f64();
        println!(
            "| {n} | {:.1} | {mean:.2} | {max:.2} |",
            generated as f64 / secs
        );
    }
    commands.send(Command::Shutdown {
        grace: Duration::ZERO,
    })?;
    drop(commands);
    thread.join().expect("scheduler thread panicked")
}
