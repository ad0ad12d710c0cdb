//! The known-answer self-test a GPU backend passes before it serves a model: a few small ops run
//! on it and on the CPU reference backend, through the [`Backend`] trait only, and compared —
//! ternary products (one token, a small batch, a GEMM-sized batch) bit for bit,
//! one prefill and one batched decode step of attention (with an f32 and an f16 cache), and the
//! float and table ops within the golden tolerances. It takes milliseconds, so kernels that never
//! ran on this device (or that a driver miscompiles) cannot silently corrupt a user's output:
//! `--backend cuda|wgpu` fails with the op's name, and `--backend auto` logs it and moves on to the
//! next backend (src/cli).
//!
//! What it leaves on the backend: one small linear, vector and table (a few KiB), and a small KV
//! cache that the model's own `alloc_kv` replaces.

use super::cpu::CpuBackend;
use super::{Activations, Backend, KvSpec, KvType, NO_PAGE, TokenPosition};
use crate::ternary::{DenseData, DenseMatrix, TernaryMatrix};
use anyhow::{Context, Result, bail};
use tern_cpu::bitlinear::reference::pack;
use tern_cpu::elementwise::GateActivation;

/// Runs the self-test on `backend`; the error names the first op that differs from the CPU.
pub fn run(backend: &mut dyn Backend) -> Result<()> {
    let mut cpu = CpuBackend::new(1)?;
    let mut pair = Pair {
        gpu: backend,
        cpu: &mut cpu,
    };
    let mut rng = Lcg(0x5eed);
    pair.bitlinear(&mut rng)?;
    pair.attention(&mut rng)?;
    pair.float_ops(&mut rng)?;
    pair.tables(&mut rng)
}

/// Deterministic test data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Values in [-2, 2).
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.next() as f32 / (1u64 << 30) as f32 - 2.0)
            .collect()
    }
}

/// How two results must agree.
#[derive(Clone, Copy)]
enum Agree {
    Bits,
    /// |a - b| ≤ tol · (1 + |b|).
    Within(f32),
}

/// The backend under test and the reference, fed the same inputs.
struct Pair<'a> {
    gpu: &'a mut dyn Backend,
    cpu: &'a mut CpuBackend,
}

impl Pair<'_> {
    fn put(&mut self, data: &[f32]) -> Result<(Activations, Activations)> {
        let g = self.gpu.alloc(data.len())?;
        self.gpu.write(g, data)?;
        let c = self.cpu.alloc(data.len())?;
        self.cpu.write(c, data)?;
        Ok((g, c))
    }

    fn alloc(&mut self, len: usize) -> Result<(Activations, Activations)> {
        Ok((self.gpu.alloc(len)?, self.cpu.alloc(len)?))
    }

    /// Reads `len` values of both buffers and compares them; frees nothing.
    fn compare(
        &mut self,
        op: &str,
        (g, c): (Activations, Activations),
        len: usize,
        agree: Agree,
    ) -> Result<()> {
        let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
        self.gpu
            .read(g, &mut a)
            .with_context(|| format!("{op}: reading the result"))?;
        self.cpu.read(c, &mut b)?;
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            let ok = x.to_bits() == y.to_bits()
                || (x.is_nan() && y.is_nan())
                || matches!(agree, Agree::Within(tol) if (x - y).abs() <= tol * (1.0 + y.abs()));
            if !ok {
                bail!("{op}: value {i} is {x}, the CPU reference gives {y}");
            }
        }
        Ok(())
    }

    fn free(&mut self, buffers: &[(Activations, Activations)]) {
        for &(g, c) in buffers {
            self.gpu.free(g);
            self.cpu.free(c);
        }
    }

    /// A 2-part linear of 200 inputs at 1, 4 and 20 tokens (the GEMV, batched GEMV and GEMM
    /// kernels of a GPU backend). Ordinary values only: this gate is about kernels that are wrong
    /// on every input; NaN and ±Inf rows are the op tests' business.
    fn bitlinear(&mut self, rng: &mut Lcg) -> Result<()> {
        let cols = 200;
        let parts: Vec<TernaryMatrix> = [37, 19]
            .iter()
            .map(|&rows| {
                let values: Vec<i8> = (0..rows * cols)
                    .map(|_| (rng.next() % 3) as i8 - 1)
                    .collect();
                TernaryMatrix::new("self-test", rows, cols, pack(&values, rows, cols)?, 0.75)
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&TernaryMatrix> = parts.iter().collect();
        let (lg, lc) = (
            self.gpu.upload_linear(&refs)?,
            self.cpu.upload_linear(&refs)?,
        );
        for tokens in [1, 4, 20] {
            let x = rng.values(tokens * cols);
            let (xs, out) = (self.put(&x)?, self.alloc(tokens * 56)?);
            self.gpu.bitlinear(xs.0, lg, tokens, out.0)?;
            self.cpu.bitlinear(xs.1, lc, tokens, out.1)?;
            let op = format!("bitlinear ({tokens} tokens)");
            self.compare(&op, out, tokens * 56, Agree::Bits)?;
            self.free(&[xs, out]);
        }
        Ok(())
    }

    /// A 5-row prefill in slot 0, then one decode step over slots 0 and 1 (GQA 4 over 2 heads),
    /// in pages of 2 positions placed out of order in the pool, with the cache in f32 and in f16.
    fn attention(&mut self, rng: &mut Lcg) -> Result<()> {
        // Two backends may round the odd rotated key to the other neighbouring f16 (their RoPE
        // differs in the last bits), which moves an output by ~1e-4; a wrong kernel moves it by
        // the values' own size.
        for (kv_type, tol) in [(KvType::F32, 1e-4), (KvType::F16, 2e-3)] {
            self.attention_of(kv_type, tol, rng)?;
        }
        Ok(())
    }

    fn attention_of(&mut self, kv_type: KvType, tol: f32, rng: &mut Lcg) -> Result<()> {
        let spec = KvSpec {
            layers: 2,
            slots: 2,
            capacity: 8,
            pages: 8,
            page_size: 2,
            kv_type,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            rope_theta: 10000.0,
        };
        self.gpu.alloc_kv(&spec)?;
        self.cpu.alloc_kv(&spec)?;
        let pages = [6, 1, 3, NO_PAGE, 4, 7, 2, 5];
        let prefill: Vec<TokenPosition> = (0..5)
            .map(|position| TokenPosition { slot: 0, position })
            .collect();
        let decode = [
            TokenPosition {
                slot: 0,
                position: 5,
            },
            TokenPosition {
                slot: 1,
                position: 0,
            },
        ];
        for (what, rows) in [("prefill", &prefill[..]), ("decode", &decode[..])] {
            let qkv = self.put(&rng.values(rows.len() * spec.qkv_width()))?;
            let n = rows.len() * spec.heads * spec.head_dim;
            let out = self.alloc(n)?;
            self.gpu.attention(1, qkv.0, rows, &pages, out.0)?;
            self.cpu.attention(1, qkv.1, rows, &pages, out.1)?;
            let op = format!("attention ({what}, {kv_type:?} cache)");
            self.compare(&op, out, n, Agree::Within(tol))?;
            self.free(&[qkv, out]);
        }
        Ok(())
    }

    /// rms_norm, the SiLU-gated product and the residual add on 3 rows of 64.
    fn float_ops(&mut self, rng: &mut Lcg) -> Result<()> {
        let (rows, width) = (3, 64);
        let n = rows * width;
        let weight = rng.values(width);
        let (wg, wc) = (
            self.gpu.upload_vector(&weight)?,
            self.cpu.upload_vector(&weight)?,
        );
        let (x, gate_up, out) = (
            self.put(&rng.values(n))?,
            self.put(&rng.values(2 * n))?,
            self.alloc(n)?,
        );
        self.gpu.rms_norm(x.0, wg, 1e-5, rows, out.0)?;
        self.cpu.rms_norm(x.1, wc, 1e-5, rows, out.1)?;
        self.compare("rms_norm", out, n, Agree::Within(1e-5))?;
        self.gpu
            .gated(gate_up.0, GateActivation::Silu, rows, width, out.0)?;
        self.cpu
            .gated(gate_up.1, GateActivation::Silu, rows, width, out.1)?;
        self.compare("gated", out, n, Agree::Within(1e-5))?;
        self.gpu.add(out.0, x.0, n)?;
        self.cpu.add(out.1, x.1, n)?;
        self.compare("add", out, n, Agree::Within(1e-5))?;
        self.free(&[x, gate_up, out]);
        Ok(())
    }

    /// embed and logits of a 50 × 64 f32 table for 2 tokens, and argmax of the logits.
    fn tables(&mut self, rng: &mut Lcg) -> Result<()> {
        let (vocab, cols, tokens) = (50, 64, [7u32, 41]);
        let table = DenseMatrix {
            rows: vocab,
            cols,
            data: DenseData::F32(rng.values(vocab * cols)),
        };
        let (tg, tc) = (
            self.gpu.upload_table(&table)?,
            self.cpu.upload_table(&table)?,
        );
        let x = self.alloc(2 * cols)?;
        self.gpu.embed(tg, &tokens, x.0)?;
        self.cpu.embed(tc, &tokens, x.1)?;
        self.compare("embed", x, 2 * cols, Agree::Bits)?;
        let logits = self.alloc(2 * vocab)?;
        self.gpu.logits(x.0, tg, 2, logits.0)?;
        self.cpu.logits(x.1, tc, 2, logits.1)?;
        self.compare("logits", logits, 2 * vocab, Agree::Within(1e-4))?;
        let (g, c) = (
            self.gpu.argmax(logits.0, 2, vocab)?,
            self.cpu.argmax(logits.1, 2, vocab)?,
        );
        if g != c {
            bail!("argmax: {g:?}, the CPU reference gives {c:?}");
        }
        self.free(&[x, logits]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{LinearId, PageTable, TableId, VectorId};

    /// The CPU backend with one op perturbed: the self-test must name that op.
    struct Perturbed {
        inner: CpuBackend,
        op: &'static str,
    }

    impl Perturbed {
        /// Adds a little to the first value of `out` when `op` is the perturbed one.
        fn touch(&mut self, op: &str, out: Activations) -> Result<()> {
            if op == self.op {
                let mut v = [0f32];
                self.inner.read(out, &mut v)?;
                self.inner.write(out, &[v[0] + 1e-3 * (1.0 + v[0].abs())])?;
            }
            Ok(())
        }
    }

    impl Backend for Perturbed {
        fn describe(&self) -> String {
            format!("cpu with {} perturbed", self.op)
        }
        fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId> {
            self.inner.upload_linear(parts)
        }
        fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId> {
            self.inner.upload_vector(values)
        }
        fn upload_table(&mut self, table: &DenseMatrix) -> Result<TableId> {
            self.inner.upload_table(table)
        }
        fn alloc(&mut self, len: usize) -> Result<Activations> {
            self.inner.alloc(len)
        }
        fn free(&mut self, buffer: Activations) {
            self.inner.free(buffer)
        }
        fn write(&mut self, dst: Activations, data: &[f32]) -> Result<()> {
            self.inner.write(dst, data)
        }
        fn read(&mut self, src: Activations, out: &mut [f32]) -> Result<()> {
            self.inner.read(src, out)
        }
        fn copy(
            &mut self,
            s: Activations,
            so: usize,
            d: Activations,
            doff: usize,
            len: usize,
        ) -> Result<()> {
            self.inner.copy(s, so, d, doff, len)
        }
        fn alloc_kv(&mut self, spec: &KvSpec) -> Result<()> {
            self.inner.alloc_kv(spec)
        }
        fn grow_kv(&mut self, pages: usize) -> Result<()> {
            self.inner.grow_kv(pages)
        }
        fn embed(&mut self, table: TableId, tokens: &[u32], out: Activations) -> Result<()> {
            self.inner.embed(table, tokens, out)?;
            self.touch("embed", out)
        }
        fn rms_norm(
            &mut self,
            x: Activations,
            w: VectorId,
            eps: f32,
            tokens: usize,
            out: Activations,
        ) -> Result<()> {
            self.inner.rms_norm(x, w, eps, tokens, out)?;
            self.touch("rms_norm", out)
        }
        fn bitlinear(
            &mut self,
            x: Activations,
            l: LinearId,
            tokens: usize,
            out: Activations,
        ) -> Result<()> {
            self.inner.bitlinear(x, l, tokens, out)?;
            // Only the GEMM-sized batch: a bug in one kernel of several.
            if tokens > 8 {
                self.touch("bitlinear", out)?;
            }
            Ok(())
        }
        fn attention(
            &mut self,
            layer: usize,
            qkv: Activations,
            rows: &[TokenPosition],
            pages: &PageTable,
            out: Activations,
        ) -> Result<()> {
            self.inner.attention(layer, qkv, rows, pages, out)?;
            self.touch("attention", out)
        }
        fn gated(
            &mut self,
            g: Activations,
            a: GateActivation,
            tokens: usize,
            width: usize,
            out: Activations,
        ) -> Result<()> {
            self.inner.gated(g, a, tokens, width, out)?;
            self.touch("gated", out)
        }
        fn add(&mut self, acc: Activations, x: Activations, len: usize) -> Result<()> {
            self.inner.add(acc, x, len)?;
            self.touch("add", acc)
        }
        fn logits(
            &mut self,
            x: Activations,
            t: TableId,
            tokens: usize,
            out: Activations,
        ) -> Result<()> {
            self.inner.logits(x, t, tokens, out)?;
            self.touch("logits", out)
        }
    }

    #[test]
    fn the_cpu_backend_passes() {
        run(&mut CpuBackend::new(1).unwrap()).unwrap();
    }

    #[test]
    fn a_perturbed_op_is_named() {
        for op in [
            "bitlinear",
            "attention",
            "rms_norm",
            "gated",
            "add",
            "embed",
            "logits",
        ] {
            let mut b = Perturbed {
                inner: CpuBackend::new(1).unwrap(),
                op,
            };
            let e = run(&mut b).expect_err(op).to_string();
            assert!(e.starts_with(op), "perturbing {op} gave: {e}");
        }
    }
}
