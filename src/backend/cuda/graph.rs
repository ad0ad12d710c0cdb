//! CUDA-graph capture and replay of a whole model step.
//!
//! The model brackets each forward pass with [`Backend::begin_step`] / [`Backend::end_step`]
//! (`super::super::Backend`). For small batches (decode and batched decode, at most
//! `GEMV_MAX_TOKENS` rows) the CUDA backend runs the first step of a given shape eagerly (which sizes
//! every scratch buffer), captures the second on its stream as a CUDA graph (then launches it), and
//! from the third on only replays the graph: one launch per step instead of ~18 per layer.
//!
//! # What a replay may change
//! Kernel arguments are frozen at capture, so everything except *host inputs* must be identical
//! between steps of one shape: buffer handles, op order, op parameters. Host inputs (token ids and
//! the rows' (slot, position) pairs) go through a pinned host arena at offsets that follow the op
//! order, and the captured copies read them from there, so writing new values before the launch is
//! all a replay needs. Attention sizes its key splits by the cache capacity, not by positions, for
//! the same reason. Every op folds its kind and parameters into a fingerprint; a replay whose
//! fingerprint differs from the captured one is an error, never a silent wrong result.
//!
//! # Invalidation
//! A graph holds raw device pointers, so freeing any activation buffer, reallocating the KV cache
//! or growing a scratch buffer drops every graph (they are captured again on later steps).
//!
//! `TERN_CUDA_GRAPHS=0` turns capture off (every step runs eagerly).

use super::device::fnv1a;
use anyhow::{Context, Result, bail};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, PinnedHostSlice, sys};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// u32 values of host input one step may stage (a decode step stages a few hundred).
const ARENA: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Ops launch directly (outside a step, or a step that is not graphed).
    Eager,
    /// The stream is being captured into the graph of this step shape.
    Capture(u64),
    /// Ops only stage their host inputs; `end_step` launches the stored graph.
    Replay(u64),
}

pub struct Graphs {
    enabled: bool,
    mode: Mode,
    seen: HashSet<u64>,
    /// Declared before `arena`, so the graphs (whose copies read it) are dropped first.
    graphs: HashMap<u64, (CudaGraph, u64)>,
    fingerprint: u64,
    /// Pinned host memory, so that copies from it can be captured.
    arena: PinnedHostSlice<u32>,
    cursor: usize,
}

impl Graphs {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: the arena is written before any copy reads it (`stage`).
        let arena = unsafe { stream.context().alloc_pinned_with_flags::<u32>(ARENA, 0) }
            .context("CUDA: allocating pinned host memory for graph inputs")?;
        Ok(Self {
            enabled: std::env::var("TERN_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            mode: Mode::Eager,
            seen: HashSet::new(),
            graphs: HashMap::new(),
            fingerprint: 0,
            arena,
            cursor: 0,
        })
    }

    /// True when ops must not launch anything (a replay: the graph does it at `end_step`).
    pub fn replaying(&self) -> bool {
        matches!(self.mode, Mode::Replay(_))
    }

    pub fn capturing(&self) -> bool {
        matches!(self.mode, Mode::Capture(_))
    }

    /// Folds one op's kind and parameters into the step's fingerprint.
    pub fn note(&mut self, op: &str, params: &[usize]) {
        let bytes: Vec<u8> = params
            .iter()
            .flat_map(|p| (*p as u64).to_le_bytes())
            .collect();
        self.fingerprint = fnv1a(&[&self.fingerprint.to_le_bytes(), op.as_bytes(), &bytes]);
    }

    /// Drops every graph (some buffer they point to is being freed or reallocated).
    pub fn invalidate(&mut self) {
        self.graphs.clear();
        self.seen.clear();
    }

    /// Starts a step of `rows` rows producing `logits_rows` rows of logits.
    pub fn begin(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: usize,
        logits_rows: usize,
        graphable: bool,
    ) -> Result<()> {
        if self.capturing() {
            // A step that failed half-way left the stream capturing: discard that capture.
            let _ = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        }
        self.mode = Mode::Eager;
        self.fingerprint = 0;
        self.cursor = 0;
        if !self.enabled || !graphable {
            return Ok(());
        }
        // The arena is about to be rewritten: the previous step's copies from it must be done.
        stream
            .synchronize()
            .context("CUDA: waiting for the previous step")?;
        let key = ((rows as u64) << 32) | logits_rows as u64;
        if self.graphs.contains_key(&key) {
            self.mode = Mode::Replay(key);
        } else if !self.seen.insert(key) {
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .context("CUDA: starting graph capture")?;
            self.mode = Mode::Capture(key);
        }
        Ok(())
    }

    /// Ends the step: stores and launches a captured graph, or launches the replayed one.
    pub fn end(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        let mode = std::mem::replace(&mut self.mode, Mode::Eager);
        match mode {
            Mode::Eager => Ok(()),
            Mode::Capture(key) => {
                let graph = stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .context("CUDA: ending graph capture")?
                    .context("CUDA: graph capture produced no graph")?;
                graph.launch().context("CUDA: launching a captured step")?;
                self.graphs.insert(key, (graph, self.fingerprint));
                Ok(())
            }
            Mode::Replay(key) => {
                let (graph, fingerprint) = self
                    .graphs
                    .get(&key)
                    .context("CUDA graph replay: the captured graph was dropped during the step")?;
                if *fingerprint != self.fingerprint {
                    bail!(
                        "CUDA graph replay: this step's ops differ from the captured step of the \
                         same shape (a bug; TERN_CUDA_GRAPHS=0 turns graphs off)"
                    );
                }
                graph.launch().context("CUDA: replaying a step")
            }
        }
    }

    /// Copies `data` to the start of `dst`: directly when eager, through the pinned arena when
    /// capturing (the copy becomes a graph node) or replaying (only the arena is written).
    pub fn stage(
        &mut self,
        stream: &Arc<CudaStream>,
        data: &[u32],
        dst: &mut CudaSlice<u32>,
    ) -> Result<()> {
        if self.mode == Mode::Eager {
            return stream
                .memcpy_htod(data, &mut dst.slice_mut(..data.len()))
                .context("CUDA: copying step inputs");
        }
        let end = self.cursor + data.len();
        if end > ARENA {
            bail!("CUDA graph step stages more than {ARENA} input values; use TERN_CUDA_GRAPHS=0");
        }
        // The arena's own event is never recorded (copies use plain slices of it), so this does
        // not wait; `begin` already waited for the stream.
        let base = self.arena.as_mut_ptr()?;
        // SAFETY: `base` addresses the `ARENA` u32 of pinned memory owned by `self.arena`, and
        // `cursor..end` is inside it; no copy from it is in flight (`begin` waited for the stream).
        let staged = unsafe {
            let slot = std::slice::from_raw_parts_mut(base.add(self.cursor), data.len());
            slot.copy_from_slice(data);
            &*slot
        };
        self.cursor = end;
        if self.capturing() {
            stream
                .memcpy_htod(staged, &mut dst.slice_mut(..data.len()))
                .context("CUDA: capturing a step input copy")?;
        }
        Ok(())
    }
}
