//! AMX-INT8 ternary GEMM for prompts (W1.58A8): `tdpbssd` on tiles of int8 weight values and int8
//! activations, int32 accumulation, integer-exact like every kernel of [`crate::bitlinear`].
//!
//! # When it runs
//! Intel Xeon 4th generation (Sapphire Rapids) and later have AMX: eight tile registers of up to
//! 16 rows × 64 bytes and `tdpbssd`, which adds a 16 × 64 int8 tile times a 64 × 16 one into a
//! 16 × 16 int32 tile (16 384 multiply-adds per instruction). [`status`] decides once per process
//! whether this module may run: the CPU must report AMX-TILE and AMX-INT8 (CPUID leaf 7), the OS
//! must enable tile state in XCR0, Linux must grant the tile data permission
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once for the whole process), the
//! AVX-512 level must be there (the weight expansion uses it), and a known-answer product against
//! [`gemm_reference`] must come out exact. Otherwise [`status`] says why, and every product is an
//! [`Error::Unsupported`] carrying that reason; nothing falls back silently.
//!
//! # Weights
//! No layout of its own: it reads [`crate::bitlinear::mad`]'s [`PackedTernary`] or
//! [`crate::bitlinear::base3`]'s [`PackedBase3`] directly, so a backend keeps one copy of its
//! weights for decode and prompts alike. A call expands the weights of one *panel* of 32 rows (8
//! groups) at a time into int8 values in the tile layout `tdpbssd` takes as its first operand, in a
//! per-thread buffer that stays in L2 (`32 · cols` bytes), and multiplies that panel with a chunk of
//! the batch's tokens (as many as fit
//! [`L2_ACTIVATION_BYTES`](crate::bitlinear::grouped::L2_ACTIVATION_BYTES) of activations, so
//! that they too stay in L2) before moving on: each weight is expanded once per chunk, and read
//! from cache once per 32 tokens. A chunk of at most 32 tokens (two token tiles: a server's
//! batched decode steps) reads each weight once, so its panels are expanded and multiplied a
//! block at a time instead, from a buffer that stays in L1 (`32 · 320` bytes at most), the
//! accumulators held in the tile registers across the blocks and the next panel's weights asked
//! for ahead into L2.
//!
//! First-operand tile of k-step `s` (columns `64 s .. 64 s + 64`) for 16 weight rows: row `r` holds
//! weight row `r`'s values of those columns. Both layouts store a row's block as a 64-byte chunk
//! whose byte `j` holds, for each plane `i`, the code of the block's column `64 i + j` (4 planes of
//! 2-bit codes in the multiply-add layout, 5 base-3 digits in the other), and a block's planes are
//! consecutive k-steps. So one load of a row's chunk gives that row of the tiles of all the block's
//! planes: plane `i` of a 2-bit chunk is a shift by `2 i` and a mask; of a base-3 chunk, the digit
//! `⌊3 x_i / 256⌋` (two unsigned comparisons) with `x_{i+1} = 3 x_i mod 256` (two byte
//! additions); then minus 1 per byte.
//!
//! # Activations
//! The second operand takes 4 consecutive codes of 16 tokens per row: row `r` of the tile of
//! k-step `s` holds, for each token `n`, the codes of columns `64 s + 4 r .. 64 s + 4 r + 4` at
//! bytes `4 n .. 4 n + 4`. Each chunk of tokens is laid out so once per call ([`QuantizedRows`]
//! rows are zero-padded past `cols`, and columns past the matrix hold weight value 0), 16 tokens a
//! tile, the tokens past the batch zero.
//!
//! # Products
//! Each step keeps 2 × 2 accumulator tiles (weight rows 0..16 and 16..32 × tokens 0..16 and
//! 16..32), loading two weight and two token tiles per k-step for four `tdpbssd`. With one token
//! tile (16 tokens or fewer) the even and odd k-steps go to separate accumulators, summed on the
//! way out: a `tdpbssd` takes several times as long to finish as to issue, so one accumulator
//! per weight half would leave the unit waiting. Values are −1..1 against −128..127, so
//! `|Σ| ≤ 128 · cols`: exact in int32. The accumulators come out weight-row-major, as the
//! row-major output of [`crate::bitlinear::mad::gemm`]'s contract wants, which this module's
//! [`gemm`] and [`gemm_base3`] share (same arguments, same errors, same row-range splitting on
//! multiples of [`ROW_GROUP`](crate::bitlinear::grouped::ROW_GROUP)). [`gemm_into`] and
//! [`gemm_base3_into`] can instead dequantize each panel's products as they leave the tiles,
//! straight into each token's outputs ([`Products::Dequantized`], what a prompt's BitLinear
//! uses): its 32 × 32 integers are dequantized a tile row (16 tokens) per vector and never travel
//! through memory.
//!
//! The 8-bit output head ([`crate::table::q8`]) runs its batches on the same tiles and step.

use crate::bitlinear::Family;
use crate::bitlinear::base3::PackedBase3;
use crate::bitlinear::dequantize::dequantize_one;
use crate::bitlinear::grouped::{Coding, Grouped};
use crate::bitlinear::mad::PackedTernary;
use crate::bitlinear::quant::QuantizedRows;
use crate::isa::Isa;
use crate::{Error, check_len};
use std::ops::Range;

/// When [`Linear::forward`](crate::bitlinear::Linear::forward) runs a batch's multiply-add and
/// base-3 products on AMX (`TERN_CPU_AMX`): never (`off`); at the AVX-512 level, for batches of at
/// least [`amx_min_tokens`] tokens, where [`status`] allows it (`auto`, the default); for every
/// batch of two tokens or more (`on`, an error where AMX is unavailable). The lookup tables have no
/// AMX path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmxUse {
    Off,
    Auto,
    On,
}

/// Environment variable that picks an [`AmxUse`] (`auto`, `on` or `off`; unset or empty: `auto`).
pub const AMX_ENV: &str = "TERN_CPU_AMX";

/// Tokens a batch needs before `auto` runs the products of a `family`'s linears on AMX: where the
/// AMX products overtake the AVX-512 kernels at the 2B-4T shapes, 5 tokens for base 3 (whose direct
/// kernel reads up to 4 tokens at once) and 8 for the 2-bit multiply-add layout; the measurements
/// are in `scripts/benchmark-log.md`.
pub fn amx_min_tokens(family: Family) -> usize {
    match family {
        Family::Base3 => 5,
        _ => 8,
    }
}

impl AmxUse {
    /// `TERN_CPU_AMX`.
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var(AMX_ENV).as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("auto") => Ok(Self::Auto),
            Ok("on") => Ok(Self::On),
            Ok("off") => Ok(Self::Off),
            Ok(other) => Err(Error::Unsupported(format!(
                "{AMX_ENV}={other}: expected auto, on or off"
            ))),
        }
    }

    /// The smallest batch whose products run on AMX for linears of `family` at `isa` (`None`:
    /// never), and a note for a backend's description (why AMX is off, where it could have run).
    pub fn min_tokens(self, isa: Isa, family: Family) -> Result<(Option<usize>, String), Error> {
        let unavailable = |why: &str| format!("AMX-INT8 unavailable: {why}");
        Ok(match (self, status()) {
            (Self::Off, _) => (None, String::new()),
            (_, _) if family == Family::Lut => (None, String::new()),
            (Self::On, Ok(())) => (Some(2), ", AMX-INT8 for every batch".to_string()),
            (Self::On, Err(why)) => {
                return Err(Error::Unsupported(format!(
                    "{AMX_ENV}=on: {}",
                    unavailable(why)
                )));
            }
            (Self::Auto, Ok(())) if isa == Isa::Avx512 => {
                let min = amx_min_tokens(family);
                (
                    Some(min),
                    format!(", AMX-INT8 for batches of {min}+ tokens"),
                )
            }
            (Self::Auto, Ok(())) => (None, String::new()),
            (Self::Auto, Err(why)) => (None, format!(", {}", unavailable(why))),
        })
    }
}

/// Whether AMX products can run in this process: `Ok`, or why not (decided once, see the module
/// documentation).
pub fn status() -> &'static Result<(), String> {
    static STATUS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    STATUS.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            x86::enable()?;
            known_answer()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        Err("AMX kernels exist for x86-64 Linux only".to_string())
    })
}

/// [`status`] as an error for a product to return.
fn check() -> Result<(), Error> {
    status()
        .as_ref()
        .map(|_| ())
        .map_err(|why| Error::Unsupported(format!("AMX-INT8 kernels unavailable: {why}")))
}

/// `acc[(n - rows.start) · tokens + t] = Σ_k W[n][k] · x[t][k]` for `n` in `rows`, exactly: the
/// contract of [`crate::bitlinear::mad::gemm`].
pub fn gemm(
    w: &PackedTernary,
    rows: Range<usize>,
    x: &QuantizedRows,
    acc: &mut [i32],
) -> Result<(), Error> {
    product(w, Digits::TwoBit, rows, x, Products::Exact(acc))
}

/// As [`gemm`], for weights in the base-3 layout.
pub fn gemm_base3(
    w: &PackedBase3,
    rows: Range<usize>,
    x: &QuantizedRows,
    acc: &mut [i32],
) -> Result<(), Error> {
    product(w, Digits::Base3, rows, x, Products::Exact(acc))
}

/// As [`gemm`], the products put into `out`.
pub fn gemm_into(
    w: &PackedTernary,
    rows: Range<usize>,
    x: &QuantizedRows,
    out: Products<'_, '_>,
) -> Result<(), Error> {
    product(w, Digits::TwoBit, rows, x, out)
}

/// As [`gemm_base3`], the products put into `out`.
pub fn gemm_base3_into(
    w: &PackedBase3,
    rows: Range<usize>,
    x: &QuantizedRows,
    out: Products<'_, '_>,
) -> Result<(), Error> {
    product(w, Digits::Base3, rows, x, out)
}

/// Where a product's results go, for `rows` and the batch's tokens.
pub enum Products<'a, 'b> {
    /// `acc[(n − rows.start) · tokens + t]`, exact ([`gemm`]'s contract).
    Exact(&'a mut [i32]),
    /// `outs[t][n − rows.start] = dequantize_one(product, token_scales[t], row_scales[n −
    /// rows.start])` ([`dequantize_one`]: the bits of [`crate::bitlinear::dequantize`]), computed
    /// as the products leave the tiles, so that they never travel through memory as integers.
    Dequantized {
        outs: &'a mut [&'b mut [f32]],
        token_scales: &'a [f32],
        row_scales: &'a [f32],
    },
}

impl Products<'_, '_> {
    /// That the outputs fit `rows` rows of `tokens` tokens.
    fn check(&self, rows: usize, tokens: usize) -> Result<(), Error> {
        match self {
            Self::Exact(acc) => check_len("ternary gemm accumulators", acc.len(), rows * tokens),
            Self::Dequantized {
                outs,
                token_scales,
                row_scales,
            } => {
                check_len("dequantized tokens", outs.len(), tokens)?;
                check_len("token scales", token_scales.len(), tokens)?;
                check_len("row scales", row_scales.len(), rows)?;
                outs.iter()
                    .try_for_each(|o| check_len("dequantized outputs of a token", o.len(), rows))
            }
        }
    }

    /// Every output of a product without columns (all sums 0).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn zero(&mut self) {
        match self {
            Self::Exact(acc) => acc.fill(0),
            Self::Dequantized {
                outs,
                token_scales,
                row_scales,
            } => {
                for (out, &s) in outs.iter_mut().zip(token_scales.iter()) {
                    for (o, &r) in out.iter_mut().zip(row_scales.iter()) {
                        *o = dequantize_one(0, s, r);
                    }
                }
            }
        }
    }

    /// A panel's products from the tiles: `tiles[2 · (r / 16) + h][r % 16][c]` is the sum of row
    /// `n0 + r` (counted from the range's start) and token `first + 16 h + c`, for `r < n_rows` and
    /// `16 h + c < n_tokens`; `tokens` is the batch's.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    fn put(
        &mut self,
        tokens: usize,
        (n0, n_rows): (usize, usize),
        (first, n_tokens): (usize, usize),
        tiles: &[[[i32; 16]; 16]; 4],
    ) {
        match self {
            Self::Exact(acc) => {
                for r in 0..n_rows {
                    let row = &mut acc[(n0 + r) * tokens + first..][..n_tokens];
                    for (h, part) in row.chunks_mut(16).enumerate() {
                        let tile_row = &tiles[2 * (r / 16) + h][r % 16];
                        // A whole row as one array: a vector move, not a call to memmove.
                        match <&mut [i32; 16]>::try_from(&mut *part) {
                            Ok(whole) => *whole = *tile_row,
                            Err(_) => part.copy_from_slice(&tile_row[..part.len()]),
                        }
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Self::Dequantized {
                outs,
                token_scales,
                row_scales,
            } => {
                let rows = &row_scales[n0..n0 + n_rows];
                let (outs, scales) = (&mut outs[first..first + n_tokens], &token_scales[first..]);
                // SAFETY: products run only where `status` found the AVX-512 level.
                unsafe { x86::dequantize_tiles(tiles, scales, rows, n0, outs) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Self::Dequantized { .. } => {
                let _ = (first, n_tokens, tiles);
            }
        }
    }
}

/// How a layout's chunk byte holds its codes (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Digits {
    /// [`crate::bitlinear::mad`]'s: four 2-bit codes, plane `i` at bits `2 i`.
    TwoBit,
    /// [`crate::bitlinear::base3`]'s: five base-3 digits, plane `i` read from `x_i`.
    Base3,
}

impl Digits {
    /// Planes (k-steps of 64 columns) per block.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn planes(self) -> usize {
        match self {
            Self::TwoBit => 4,
            Self::Base3 => 5,
        }
    }
}

/// Checks the arguments, then runs the panels.
fn product<C: Coding>(
    w: &Grouped<C>,
    digits: Digits,
    rows: Range<usize>,
    x: &QuantizedRows,
    out: Products<'_, '_>,
) -> Result<(), Error> {
    check()?;
    w.check_operands(Isa::Avx512, rows.clone(), x)?;
    out.check(rows.len(), x.rows())?;
    if rows.is_empty() || x.rows() == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        x86::panels(w, digits, rows, x, out);
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // `check` has already refused (AMX exists on x86-64 only); an error, never a panic.
        let _ = (digits, out);
        Err(Error::Unsupported(
            "AMX-INT8 kernels need x86-64".to_string(),
        ))
    }
}

/// A small product against the reference, run once before the first use.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn known_answer() -> Result<(), String> {
    use crate::bitlinear::reference::{TernaryView, gemm_reference, pack};
    // 41 rows (a partial panel and group), 300 columns (a partial block), 37 tokens (a partial
    // step), values and activations from a fixed generator with the extremes mixed in.
    let (rows, cols, tokens) = (41, 300, 37);
    let mut seed = 0x5eed_u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let values: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|i| match i % 7 {
            0 => -128.0,
            1 => 127.0,
            _ => (next() % 256) as f32 - 128.0,
        })
        .collect();
    let codes = pack(&values, rows, cols).map_err(|e| e.to_string())?;
    let view = TernaryView::new(&codes, rows, cols).map_err(|e| e.to_string())?;
    let mut q = QuantizedRows::default();
    q.quantize(Isa::Scalar, &x, tokens, cols)
        .map_err(|e| e.to_string())?;
    let flat: Vec<i8> = (0..tokens)
        .flat_map(|t| q.row(t)[..cols].to_vec())
        .collect();
    let mut want = vec![0; rows * tokens];
    gemm_reference(view, &flat, tokens, &mut want).map_err(|e| e.to_string())?;
    let mut got = vec![i32::MIN; rows * tokens];
    #[cfg(target_arch = "x86_64")]
    {
        let two_bit = PackedTernary::from_canonical(view);
        x86::panels(
            &two_bit,
            Digits::TwoBit,
            0..rows,
            &q,
            Products::Exact(&mut got),
        );
        if got == want {
            let base3 = PackedBase3::from_canonical(view);
            got.fill(i32::MIN);
            x86::panels(
                &base3,
                Digits::Base3,
                0..rows,
                &q,
                Products::Exact(&mut got),
            );
        }
    }
    if got == want {
        Ok(())
    } else {
        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        Err(format!(
            "the start-up known-answer product differs from the reference (output {at}: {} \
             instead of {})",
            got[at], want[at]
        ))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Coding, Digits, Grouped, Products};
    use crate::bitlinear::grouped::{CHUNK, ROW_GROUP, chunk_tokens};
    use crate::bitlinear::quant::QuantizedRows;
    use crate::isa::{Isa, prefetch_l2, prefetch_lines};
    use crate::lanes::transpose_16x16;
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::ops::Range;

    /// Weight rows per panel: two tiles of 16.
    const PANEL_ROWS: usize = 32;
    const PANEL_GROUPS: usize = PANEL_ROWS / ROW_GROUP;
    /// Tokens per tile.
    const TILE_TOKENS: usize = 16;
    /// Bytes of a group's block (4 rows' chunks).
    const BLOCK_BYTES: usize = ROW_GROUP * CHUNK;
    /// Bytes of one tile (16 rows of 64).
    pub(crate) const TILE_BYTES: usize = 1024;

    /// One 64-byte line, so that tiles and tile configurations sit on cache-line boundaries.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    pub(crate) struct Line(pub(crate) [u8; 64]);

    /// A vector value the optimizer cannot see through (an empty asm block that "writes" its
    /// register), so that it keeps the instructions written around it; inside functions with the
    /// AVX-512 F target feature only.
    macro_rules! hidden {
        ($v:expr) => {{
            let mut v: __m512i = $v;
            // SAFETY: an empty instruction sequence: reads and writes nothing but `v`'s register.
            unsafe { asm!("/* {0} */", inout(zmm_reg) v, options(pure, nomem, nostack, preserves_flags)) };
            v
        }};
    }

    /// Per-thread buffers: a panel's expanded weight tiles and a chunk's activation tiles.
    #[derive(Default)]
    struct Scratch {
        weights: Vec<Line>,
        tokens: Vec<Line>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    /// Linux's `arch_prctl` requests (`asm/prctl.h`) and the tile data state component.
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_GET_XCOMP_PERM: i64 = 0x1022;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;

    /// Checks the CPU and OS support and asks Linux for the tile data permission.
    pub(super) fn enable() -> Result<(), String> {
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
        if !tile || !int8 {
            return Err("the CPU does not report AMX-TILE and AMX-INT8".to_string());
        }
        if !Isa::Avx512.is_supported() {
            return Err("the CPU lacks the AVX-512 level the weight expansion uses".to_string());
        }
        let osxsave = __cpuid(1).ecx >> 27 & 1 == 1;
        if !osxsave {
            return Err("the OS does not enable XSAVE".to_string());
        }
        // SAFETY: OSXSAVE is set, so XGETBV is available.
        let xcr0 = unsafe { xgetbv0() };
        if xcr0 >> 17 & 3 != 3 {
            return Err(format!(
                "the OS does not enable tile state (XCR0 = {xcr0:#x})"
            ));
        }
        // SAFETY: `arch_prctl` with these requests reads and changes only this process's
        // permission mask; it touches no memory of ours.
        let granted = unsafe { arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if granted != 0 {
            return Err(format!(
                "Linux refused the tile data permission (arch_prctl(ARCH_REQ_XCOMP_PERM) = \
                 {granted})"
            ));
        }
        let mut mask = 0u64;
        // SAFETY: the kernel writes the permitted feature mask into `mask`, which lives on.
        let got = unsafe { arch_prctl(ARCH_GET_XCOMP_PERM, (&raw mut mask) as i64) };
        if got != 0 || mask >> XFEATURE_XTILEDATA & 1 == 0 {
            return Err(format!(
                "Linux does not report the tile data permission (mask {mask:#x})"
            ));
        }
        Ok(())
    }

    /// # Safety
    /// OSXSAVE must be set (CPUID leaf 1).
    unsafe fn xgetbv0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0 (the caller checked OSXSAVE).
        unsafe {
            asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack));
        }
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// # Safety
    /// `arg` must be what `code` expects (an address for the GET requests).
    unsafe fn arch_prctl(code: i64, arg: i64) -> i64 {
        let ret: i64;
        // SAFETY: a Linux x86-64 system call: number in rax, arguments in rdi and rsi, rcx and
        // r11 clobbered by `syscall`; the caller vouches for the arguments.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") code,
                in("rsi") arg,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// Runs `f` with every tile register configured as 16 rows of 64 bytes (palette 1), and
    /// releases the tile state when `f` returns or unwinds.
    ///
    /// # Safety
    /// [`enable`] has succeeded in this process (AMX-TILE, with the OS's and Linux's permission).
    pub(crate) unsafe fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
        let mut config = Line([0; 64]);
        config.0[0] = 1;
        for t in 0..8 {
            config.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            config.0[48 + t] = 16;
        }
        // SAFETY: AMX-TILE is usable (contract); the configuration is 64 valid bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        let _release = TileRelease;
        f()
    }

    /// The product of the module documentation over `rows` (starting at a multiple of 4, inside
    /// the matrix), after the caller checked the arguments and [`super::status`]'s CPU and OS
    /// support (the known-answer check itself calls it before).
    pub(super) fn panels<C: Coding>(
        w: &Grouped<C>,
        digits: Digits,
        rows: Range<usize>,
        x: &QuantizedRows,
        out: Products<'_, '_>,
    ) {
        // SAFETY: the caller's contract: `enable` found AMX-TILE with the OS's and Linux's
        // permission.
        unsafe {
            with_tiles(|| SCRATCH.with_borrow_mut(|s| product_tiles(s, w, digits, rows, x, out)))
        }
    }

    /// [`panels`], called inside [`with_tiles`] only.
    fn product_tiles<C: Coding>(
        s: &mut Scratch,
        w: &Grouped<C>,
        digits: Digits,
        rows: Range<usize>,
        x: &QuantizedRows,
        mut products: Products<'_, '_>,
    ) {
        let (tokens, blocks) = (x.rows(), w.blocks());
        let steps = blocks * (C::BLOCK_COLS / CHUNK);
        let pc = x.padded_cols();
        assert!(
            rows.start.is_multiple_of(ROW_GROUP)
                && products.check(rows.len(), tokens).is_ok()
                && pc >= steps * 64
                && x.codes().len() == tokens * pc,
            "AMX panels: unchecked arguments"
        );
        if steps == 0 || tokens == 0 {
            products.zero();
            return;
        }
        let first_group = rows.start / ROW_GROUP;
        let last_group = rows.end.div_ceil(ROW_GROUP);
        let mut out = [[[0i32; 16]; 16]; 4];
        // Each panel's weights are expanded once per chunk of tokens, and the chunk's
        // activation tiles stay in L2 beside the panel's expanded weights.
        let per_chunk = chunk_tokens(pc, 2 * TILE_TOKENS);
        for t0 in (0..tokens).step_by(per_chunk) {
            let chunk = t0..tokens.min(t0 + per_chunk);
            let token_tiles = chunk.len().div_ceil(TILE_TOKENS);
            let token_lines = lines(&mut s.tokens, token_tiles * steps * 16);
            for (u, tiles) in token_lines.chunks_exact_mut(steps * 16).enumerate() {
                let first = chunk.start + u * TILE_TOKENS;
                let count = (chunk.end - first).min(TILE_TOKENS);
                // SAFETY: AVX-512 is checked by `enable`.
                unsafe { lay_out_tile(count, |n| x.row(first + n), tiles) };
            }
            for p0 in (first_group..last_group).step_by(PANEL_GROUPS) {
                let groups: [Option<&[u8]>; PANEL_GROUPS] =
                    std::array::from_fn(|i| (p0 + i < last_group).then(|| w.group(p0 + i)));
                let n0 = p0 * ROW_GROUP - rows.start; // panel's first row in `acc`
                let n_rows = (rows.len() - n0).min(PANEL_ROWS);
                let all_tokens = s.tokens.as_ptr().cast::<u8>();
                if token_tiles <= 2 {
                    let next: [Option<&[u8]>; PANEL_GROUPS] = std::array::from_fn(|i| {
                        let g = p0 + PANEL_GROUPS + i;
                        (g < last_group).then(|| w.group(g))
                    });
                    let pair = token_tiles == 2;
                    let panel = Panel {
                        groups: &groups,
                        next: &next,
                        blocks,
                        digits,
                    };
                    // SAFETY: inside `with_tiles` (this function's contract), AVX-512 checked
                    // by `enable`; `s.tokens` holds `token_tiles` tiles of `steps` tiles each.
                    unsafe { fused_panel(&mut s.weights, panel, all_tokens, pair, &mut out) };
                    products.put(tokens, (n0, n_rows), (chunk.start, chunk.len()), &out);
                    continue;
                }
                let weights = lines(&mut s.weights, 2 * steps * 16);
                // SAFETY: AVX-512 is checked by `enable`; each group holds `blocks` blocks
                // and `weights` 2 · `steps` tiles.
                unsafe { expand_avx512(&groups, 0..blocks, digits, weights) };
                for tt in (0..token_tiles).step_by(2) {
                    let pair = token_tiles - tt >= 2;
                    let b = all_tokens.wrapping_add(tt * steps * TILE_BYTES);
                    // SAFETY: `weights` holds two panel halves of `steps` tiles of 1024 bytes,
                    // `tokens` from tile `tt` on `steps` tiles for each of the one or two
                    // token tiles used, `out` four tiles of 16 × 16 i32, and the caller runs
                    // this inside `with_tiles`.
                    unsafe { step_tiles(weights.as_ptr().cast(), b, steps, pair, &mut out) };
                    let first = chunk.start + tt * TILE_TOKENS;
                    let n_tokens = (chunk.end - first).min(2 * TILE_TOKENS);
                    // out[2 · row half + token half][row][token].
                    products.put(tokens, (n0, n_rows), (first, n_tokens), &out);
                }
            }
        }
    }

    /// The first `n` lines of a scratch `buffer` ([`crate::grown`]: every line a product reads, it
    /// writes first).
    fn lines(buffer: &mut Vec<Line>, n: usize) -> &mut [Line] {
        crate::grown(buffer, n, Line([0; 64]))
    }

    /// A panel's weights: its groups (`None` past the matrix), the next panel's (to ask for
    /// ahead), their blocks and how their bytes hold the codes.
    struct Panel<'a> {
        groups: &'a [Option<&'a [u8]>; PANEL_GROUPS],
        next: &'a [Option<&'a [u8]>; PANEL_GROUPS],
        blocks: usize,
        digits: Digits,
    }

    /// A panel's products with one or two token tiles (`pair`) at `tokens` (`blocks · planes`
    /// tiles each), into `out` as [`step_tiles`] puts them, in one pass over the panel: each
    /// block is expanded into `weights` (its tiles stay in L1) and multiplied at once, the
    /// accumulators held in the tile registers across the blocks, which spares the round trip of
    /// the whole expanded panel through L2 when each weight meets at most 32 tokens.
    ///
    /// # Safety
    /// Inside [`with_tiles`], after [`enable`] found the AVX-512 level; `tokens` points to one
    /// token tile of `blocks · planes` tiles of 1024 bytes (two, the second right after the
    /// first, when `pair`), as [`lay_out_tile`] lays them out.
    unsafe fn fused_panel(
        weights: &mut Vec<Line>,
        panel: Panel<'_>,
        tokens: *const u8,
        pair: bool,
        out: &mut [[[i32; 16]; 16]; 4],
    ) {
        let planes = panel.digits.planes();
        let steps = panel.blocks * planes;
        let weights = lines(weights, 2 * planes * 16);
        // SAFETY: this runs inside `with_tiles`.
        unsafe { zero_accumulators() };
        for b in 0..panel.blocks {
            // The panel's groups are eight streams read a block at a time with work between,
            // which the hardware prefetchers alone do not keep fed (the products ran slower than
            // expanding the whole panel first): each block asks for the same block of the next
            // panel's groups, into L2.
            for g in panel.next.iter().flatten() {
                prefetch_lines(&g[b * BLOCK_BYTES..][..BLOCK_BYTES], prefetch_l2);
            }
            // SAFETY: AVX-512 is checked by `enable`; each group holds `blocks` blocks and
            // `weights` 2 · `planes` tiles.
            unsafe { expand_avx512(panel.groups, b..b + 1, panel.digits, weights) };
            // SAFETY: `weights` holds the block's two panel halves of `planes` tiles of 1024
            // bytes; each token tile holds `steps` tiles, of which the block's `planes` from
            // `b · planes` on are read; inside `with_tiles`.
            unsafe {
                accumulate(
                    weights.as_ptr().cast(),
                    planes * TILE_BYTES,
                    tokens.wrapping_add(b * planes * TILE_BYTES),
                    steps * TILE_BYTES,
                    planes,
                    pair,
                )
            };
        }
        // SAFETY: `out` is four tiles of 16 × 16 i32; inside `with_tiles`.
        unsafe { store_accumulators(out, pair) };
    }

    /// [`Products::Dequantized`]'s part of [`Products::put`]: `outs[c][n0 + r] =
    /// dequantize_one(tiles[2 · (r / 16) + c / 16][r % 16][c % 16], scales[c], rows[r])` for
    /// `r < rows.len()` and `c < outs.len()`. Each tile row (16 tokens of one weight row) is
    /// dequantized as one vector (a vector division by the tokens' scales, then a multiplication
    /// by the row's: the operations and order of [`super::dequantize_one`]); the 16 vectors of a
    /// tile are then transposed in registers, so that each token's 16 outputs leave as one store.
    ///
    /// # Safety
    /// The CPU has the AVX-512 level.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn dequantize_tiles(
        tiles: &[[[i32; 16]; 16]; 4],
        scales: &[f32],
        rows: &[f32],
        n0: usize,
        outs: &mut [&mut [f32]],
    ) {
        debug_assert!(rows.len() <= 32 && outs.len() <= 32 && scales.len() >= outs.len());
        for (h, outs) in outs.chunks_mut(16).enumerate() {
            let mut token_scales = [1f32; 16];
            token_scales[..outs.len()].copy_from_slice(&scales[16 * h..][..outs.len()]);
            let token_scales = f32x16(&token_scales);
            for (half, rows) in rows.chunks(16).enumerate() {
                let tile = &tiles[2 * half + h];
                let mut v = [_mm512_setzero_ps(); 16];
                for ((v, tile_row), &row_scale) in v.iter_mut().zip(tile).zip(rows) {
                    // SAFETY: a tile row is 16 i32.
                    let sums = unsafe { _mm512_loadu_si512(tile_row.as_ptr().cast()) };
                    let divided = _mm512_div_ps(_mm512_cvtepi32_ps(sums), token_scales);
                    *v = _mm512_mul_ps(divided, _mm512_set1_ps(row_scale));
                }
                let v = transpose_16x16(v);
                let mask = (u32::MAX >> (32 - rows.len())) as u16;
                for (out, v) in outs.iter_mut().zip(v) {
                    let out = &mut out[n0 + 16 * half..][..rows.len()];
                    // SAFETY: the mask writes the first `rows.len()` lanes, all inside `out`.
                    unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v) };
                }
            }
        }
    }

    /// 16 f32 as one vector.
    #[target_feature(enable = "avx512f")]
    fn f32x16(values: &[f32; 16]) -> __m512 {
        // SAFETY: 16 f32 readable.
        unsafe { _mm512_loadu_ps(values.as_ptr()) }
    }

    /// Lays `count` ≤ 16 rows of int8 codes out as one token tile's second operands (see the module
    /// documentation): the tile of k-step `s` at `tiles[16 s ..]`, its row `r` holding, for each
    /// row `n`, codes `64 s + 4 r .. 64 s + 4 r + 4` of row `n` at bytes `4 n .. 4 n + 4`; rows
    /// past `count` are zero. `row(n)` gives row `n < count`, at least `4 · tiles.len()` codes.
    /// Each k-step is a 16 × 16 transposition of 4-byte words, done in registers.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn lay_out_tile<'a>(
        count: usize,
        row: impl Fn(usize) -> &'a [i8],
        tiles: &mut [Line],
    ) {
        assert!(
            count <= TILE_TOKENS,
            "{count} rows for a tile of {TILE_TOKENS}"
        );
        let rows: [Option<&[i8]>; TILE_TOKENS] =
            std::array::from_fn(|n| (n < count).then(|| row(n)));
        for (s, lines) in tiles.chunks_exact_mut(16).enumerate() {
            let words: [__m512; TILE_TOKENS] = std::array::from_fn(|n| match rows[n] {
                Some(codes) => {
                    let codes = &codes[64 * s..][..64];
                    // SAFETY: `codes` is 64 readable bytes.
                    unsafe { _mm512_loadu_ps(codes.as_ptr().cast()) }
                }
                None => _mm512_setzero_ps(),
            });
            for (line, words) in lines.iter_mut().zip(transpose_16x16(words)) {
                // SAFETY: a line is 64 writable bytes.
                unsafe { _mm512_storeu_ps(line.0.as_mut_ptr().cast(), words) };
            }
        }
    }

    /// Releases this thread's tile state when dropped (on every return and unwind of a product
    /// that loaded a configuration).
    struct TileRelease;

    impl Drop for TileRelease {
        fn drop(&mut self) {
            // SAFETY: only made after a tile configuration was loaded on this thread, so AMX-TILE
            // is usable; `tilerelease` returns the tiles to their initial state.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One step over all k-steps: `out[2 h + u] = A_h · B_u`, `A_h` being panel half `h` of
    /// `weights` and `B_u` token tile `u` of `tokens` (`u` = 0 only, when `pair` is false; then
    /// `out[1]` and `out[3]` are scratch).
    ///
    /// # Safety
    /// [`with_tiles`]'s configuration is loaded on this thread; `weights` points to
    /// `2 · steps · 1024` readable bytes, `tokens` to `steps · 1024` (twice that when `pair`), and
    /// `steps > 0`.
    pub(crate) unsafe fn step_tiles(
        weights: *const u8,
        tokens: *const u8,
        steps: usize,
        pair: bool,
        out: &mut [[[i32; 16]; 16]; 4],
    ) {
        let stride = steps * TILE_BYTES;
        // SAFETY: the contract, with the halves and token tiles `stride` bytes apart.
        unsafe {
            zero_accumulators();
            accumulate(weights, stride, tokens, stride, steps, pair);
            store_accumulators(out, pair);
        }
    }

    /// Zeroes the accumulator tiles `tmm0` to `tmm3`. They keep their values from one asm block
    /// to the next: nothing in this crate uses AMX intrinsics, and the compiler never allocates
    /// tile registers, so only these functions touch them between `with_tiles`'s configuration
    /// and its release (the OS saves them across context switches with the rest of the state).
    ///
    /// # Safety
    /// [`with_tiles`]'s configuration is loaded on this thread.
    unsafe fn zero_accumulators() {
        // SAFETY: tile registers only, configured (contract).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
    }

    /// `steps` k-steps added to the accumulators: `tmm(2 h + u) += A_h · B_u` for each, `A_h` at
    /// `weights + h · half_stride` and `B_u` at `tokens + u · tile_stride` (1024 bytes a k-step;
    /// `u` = 0 only, when `pair` is false).
    ///
    /// # Safety
    /// [`with_tiles`]'s configuration is loaded on this thread; `steps · 1024` bytes are readable
    /// at each `A_h` and each `B_u` used, and `steps > 0`.
    unsafe fn accumulate(
        weights: *const u8,
        half_stride: usize,
        tokens: *const u8,
        tile_stride: usize,
        steps: usize,
        pair: bool,
    ) {
        let (a0, a1) = (weights, weights.wrapping_add(half_stride));
        let (b0, b1) = (tokens, tokens.wrapping_add(tile_stride));
        if pair {
            // SAFETY: every address read lies in the two panel halves or the two token tiles'
            // `steps` tiles (contract).
            unsafe {
                asm!(
                    "2:",
                    "tileloadd tmm4, [{a0} + {s64}*1]",
                    "tileloadd tmm5, [{a1} + {s64}*1]",
                    "tileloadd tmm6, [{b0} + {s64}*1]",
                    "tileloadd tmm7, [{b1} + {s64}*1]",
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm1, tmm4, tmm7",
                    "tdpbssd tmm2, tmm5, tmm6",
                    "tdpbssd tmm3, tmm5, tmm7",
                    "add {a0}, 1024",
                    "add {a1}, 1024",
                    "add {b0}, 1024",
                    "add {b1}, 1024",
                    "dec {n}",
                    "jnz 2b",
                    a0 = inout(reg) a0 => _,
                    a1 = inout(reg) a1 => _,
                    b0 = inout(reg) b0 => _,
                    b1 = inout(reg) b1 => _,
                    n = inout(reg) steps => _,
                    s64 = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        } else {
            // SAFETY: as above, with one token tile: two k-steps a round, the even ones into
            // `tmm0` and `tmm2`, the odd ones into `tmm1` and `tmm3` (a product takes several
            // times as long to finish as to issue, so two accumulators would keep the unit
            // waiting), then the last k-step of an odd count.
            unsafe {
                asm!(
                    "test {n}, {n}",
                    "jz 3f",
                    "2:",
                    "tileloadd tmm4, [{a0} + {s64}*1]",
                    "tileloadd tmm5, [{a1} + {s64}*1]",
                    "tileloadd tmm6, [{b0} + {s64}*1]",
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm2, tmm5, tmm6",
                    "tileloadd tmm4, [{a0} + {s64}*1 + 1024]",
                    "tileloadd tmm5, [{a1} + {s64}*1 + 1024]",
                    "tileloadd tmm7, [{b0} + {s64}*1 + 1024]",
                    "tdpbssd tmm1, tmm4, tmm7",
                    "tdpbssd tmm3, tmm5, tmm7",
                    "add {a0}, 2048",
                    "add {a1}, 2048",
                    "add {b0}, 2048",
                    "dec {n}",
                    "jnz 2b",
                    "3:",
                    "test {odd}, {odd}",
                    "jz 4f",
                    "tileloadd tmm4, [{a0} + {s64}*1]",
                    "tileloadd tmm5, [{a1} + {s64}*1]",
                    "tileloadd tmm6, [{b0} + {s64}*1]",
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm2, tmm5, tmm6",
                    "4:",
                    a0 = inout(reg) a0 => _,
                    a1 = inout(reg) a1 => _,
                    b0 = inout(reg) b0 => _,
                    n = inout(reg) steps / 2 => _,
                    odd = in(reg) steps % 2,
                    s64 = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
    }

    /// The accumulators into `out`: `tmm(2 h + u)` to `out[2 h + u]`, or with one token tile (not
    /// `pair`), `tmm(2 h) + tmm(2 h + 1)` (the even and odd k-steps of [`accumulate`]) to
    /// `out[2 h]`, `out[1]` and `out[3]` then holding scratch (the odd k-steps' share).
    ///
    /// # Safety
    /// [`with_tiles`]'s configuration is loaded on this thread.
    unsafe fn store_accumulators(out: &mut [[[i32; 16]; 16]; 4], pair: bool) {
        let c = out.as_mut_ptr();
        // SAFETY: the stores write inside the four 1 KiB tiles of `out`.
        unsafe {
            asm!(
                "tilestored [{c} + {s64}*1], tmm0",
                "tilestored [{c} + {s64}*1 + 1024], tmm1",
                "tilestored [{c} + {s64}*1 + 2048], tmm2",
                "tilestored [{c} + {s64}*1 + 3072], tmm3",
                s64 = in(reg) 64usize,
                c = in(reg) c,
                options(nostack),
            );
        }
        if !pair {
            for h in 0..2 {
                let (even, odd) = out[2 * h..].split_at_mut(1);
                for (e, o) in even[0].iter_mut().zip(&odd[0]) {
                    // Whole rows, so that the additions are vector ones.
                    *e = std::array::from_fn(|c| e[c] + o[c]);
                }
            }
        }
    }

    /// Expands `blocks` of a panel of up to 8 groups (codes as `digits` says; `None` past the
    /// matrix, expanded as zeros) into `2 · steps` weight tiles (see the module documentation):
    /// panel half `h`'s tile of k-step `s` (counted from the first block's) at
    /// `tiles[(h · steps + s) · 16 ..]`, `steps` being `blocks.len()` times the planes, its row
    /// `r` the values of weight row `16 h + r`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F + BW; each group holds `blocks.end · 256` bytes and `tiles`
    /// `2 · steps · 16` lines.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn expand_avx512(
        groups: &[Option<&[u8]>; PANEL_GROUPS],
        blocks: Range<usize>,
        digits: Digits,
        tiles: &mut [Line],
    ) {
        let planes = digits.planes();
        let steps = blocks.len() * planes;
        assert!(
            groups
                .iter()
                .flatten()
                .all(|g| g.len() >= blocks.end * ROW_GROUP * CHUNK)
                && tiles.len() >= 2 * steps * 16
        );
        let (mask, one, minus_one) = (
            _mm512_set1_epi8(3),
            _mm512_set1_epi8(1),
            _mm512_set1_epi8(-1),
        );
        let (third, two_thirds) = (_mm512_set1_epi8(85), _mm512_set1_epi8(170u8 as i8));
        for (g, group) in groups.iter().enumerate() {
            let (half, first) = (g / 4, (g % 4) * ROW_GROUP);
            for (local, b) in blocks.clone().enumerate() {
                for r in 0..ROW_GROUP {
                    let tile_row = |i: usize| (half * steps + planes * local + i) * 16 + first + r;
                    let Some(group) = group else {
                        for i in 0..planes {
                            tiles[tile_row(i)] = Line([0; 64]);
                        }
                        continue;
                    };
                    let chunk = &group[(b * ROW_GROUP + r) * CHUNK..][..CHUNK];
                    // SAFETY: `chunk` is 64 readable bytes.
                    let mut codes = unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) };
                    for i in 0..planes {
                        let values = match digits {
                            Digits::TwoBit => {
                                let v = _mm512_sub_epi8(_mm512_and_si512(codes, mask), one);
                                codes = _mm512_srli_epi32::<2>(codes);
                                v
                            }
                            Digits::Base3 => {
                                // ⌊3 x / 256⌋ = (x > 85) + (x > 170), minus 1; then 3 x mod 256.
                                // Two values hidden from the optimizer, which would otherwise
                                // turn these two masked additions into three comparisons and
                                // three selections, and x + x + x into a multiplication of
                                // bytes (four instructions).
                                let above = _mm512_cmpgt_epu8_mask(codes, third);
                                let v =
                                    hidden!(_mm512_mask_add_epi8(minus_one, above, minus_one, one));
                                let above = _mm512_cmpgt_epu8_mask(codes, two_thirds);
                                let v = _mm512_mask_add_epi8(v, above, v, one);
                                let twice = hidden!(_mm512_add_epi8(codes, codes));
                                codes = _mm512_add_epi8(twice, codes);
                                v
                            }
                        };
                        let line = &mut tiles[tile_row(i)];
                        // SAFETY: `line` is 64 writable bytes.
                        unsafe { _mm512_storeu_si512(line.0.as_mut_ptr().cast(), values) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::grouped::ROW_GROUP;
    use crate::bitlinear::reference::TernaryView;
    use crate::bitlinear::testing::{
        case, check_bad_arguments, check_extremes, raw_codes, real_shape_cases, reference,
    };

    /// Whether this machine skips the AMX tests (the reason printed): where the CPU, OS or Linux
    /// do not allow AMX. Where they do, a failed start-up known-answer check is a test failure.
    fn skip() -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let allowed = x86::enable();
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let allowed = Err("not x86-64 Linux".to_string());
        match allowed {
            Ok(()) => {
                if let Err(why) = status() {
                    panic!("AMX is allowed here but unusable: {why}");
                }
                false
            }
            Err(why) => {
                println!("skipped: AMX-INT8 kernels unavailable here: {why}");
                true
            }
        }
    }

    /// Both layouts against the reference: whole, and split at a multiple of 4 near the middle
    /// into poisoned halves, as threads split it.
    fn check(codes: &[u8], rows: usize, cols: usize, q: &QuantizedRows) {
        let view = TernaryView::new(codes, rows, cols).unwrap();
        let want = reference(view, q);
        let tokens = q.rows();
        let mad = PackedTernary::from_canonical(view);
        let base3 = PackedBase3::from_canonical(view);
        let run = |range: Range<usize>, acc: &mut [i32], which: usize| match which {
            0 => gemm(&mad, range, q, acc),
            _ => gemm_base3(&base3, range, q, acc),
        };
        for which in 0..2 {
            let mut got = vec![i32::MIN; rows * tokens];
            run(0..rows, &mut got, which).unwrap();
            assert!(
                got == want,
                "layout {which}: {rows}x{cols}, {tokens} tokens"
            );
            let mid = (rows / 2) / ROW_GROUP * ROW_GROUP;
            got.fill(i32::MIN);
            let (lo, hi) = got.split_at_mut(mid * tokens);
            run(0..mid, lo, which).unwrap();
            run(mid..rows, hi, which).unwrap();
            assert!(
                got == want,
                "layout {which}: split {rows}x{cols}, {tokens} tokens"
            );
        }
    }

    #[test]
    fn integer_exact_on_the_real_shapes() {
        if skip() {
            return;
        }
        for (rows, cols, tokens, seed) in real_shape_cases().chain([(2560, 6912, 70, 9)]) {
            let (codes, q) = case(rows, cols, tokens, seed);
            check(&codes, rows, cols, &q);
        }
    }

    #[test]
    fn integer_exact_on_awkward_shapes() {
        if skip() {
            return;
        }
        for (rows, cols, tokens) in [
            (4, 256, 1),
            (1, 1, 1),
            (3, 5, 2),
            (7, 300, 33),
            (13, 512, 17),
            (36, 768, 64),
            (5, 1000, 31),
            (256, 256, 9),
            (100, 1300, 128),
        ] {
            let (codes, q) = case(rows, cols, tokens, (rows * cols + tokens) as u64);
            check(&codes, rows, cols, &q);
        }
    }

    #[test]
    fn invalid_codes_and_padding_pairs_read_as_zero_like_the_reference() {
        if skip() {
            return;
        }
        let (rows, cols) = (9, 301);
        let codes = raw_codes(rows, cols, 3);
        let (_, q) = case(0, cols, 35, 4);
        check(&codes, rows, cols, &q);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        if skip() {
            return;
        }
        check_extremes(6912, PackedTernary::from_canonical, |_, w, r, q, acc| {
            gemm(w, r, q, acc)
        });
    }

    #[test]
    fn bad_arguments_are_errors() {
        if skip() {
            return;
        }
        check_bad_arguments(256, PackedTernary::from_canonical, |isa, w, r, q, acc| {
            isa.check()?;
            gemm(w, r, q, acc)
        });
    }

    #[test]
    fn unavailable_is_an_error_naming_the_reason() {
        if let Err(why) = status() {
            let (codes, q) = case(4, 256, 2, 1);
            let view = TernaryView::new(&codes, 4, 256).unwrap();
            let e = gemm(&PackedTernary::from_canonical(view), 0..4, &q, &mut [0; 8]).unwrap_err();
            assert!(e.to_string().contains(why.as_str()), "{e}");
        }
    }
}
