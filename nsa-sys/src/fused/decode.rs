//! One NSA decode step on CUDA: the kernels of `nsa-sys/kernels/decode.cu` (compressed
//! branch, selection, selected and window branches, gated mix) launched from here on libtorch's
//! current stream, or replayed as a CUDA graph ([`DecodeStep::capture`]); and the step's
//! prologue before them ([`decode_append`]: the rotated queries, the cache writes, the gates).
//!
//! A [`DecodeStep`] holds its inputs (shallow clones: the caller may overwrite them in place
//! between launches, e.g. the next token's query), its workspace and its outputs, all allocated
//! once, so a launch allocates nothing and a captured graph stays valid for as long as the step
//! lives. Every sequence's position must stay `≤ max_position` (the grid and the workspace are
//! sized for it; a larger position reads nothing out of bounds but attends a clipped prefix).
//!
//! Layouts: `q` `[B, Hkv, h, dk]` (query head `g·h + i`); the caches `[B, Hkv, slots, d]`:
//! raw keys/values (slot = position), compressed (slot = index), the window ring (slot =
//! position mod `w`; without a ring the window reads the raw buffer); `positions` int64 `[B]`
//! (`t_b`, the new token's position, already written to every buffer); `gates` `[B, H, 3]`
//! (cmp, slc, win). Output `[B, H, dv]` in the inputs' kind and the selected blocks int64
//! `[B, Hkv, n]` (ascending, `−1` padded).
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::Mutex;

use tch::{Kind, Tensor};

use super::{
    cubin, cuda_ordinal, device_setup, input, load_module, loaded_once, module_function,
    FusedError, FusedOptions, SelectParams, MMA_HEAD_DIMS,
};
use crate::autograd::{glue_error, ERR_LEN};
use crate::driver::{
    self, check, CuFunction, CuStream, LaunchAttribute, LaunchConfig,
    LAUNCH_ATTR_PROGRAMMATIC_SERIALIZATION,
};
use crate::nvrtc::DECODE;

/// Keys per tile of the decode kernels (`NSA_DEC_KEYS`).
const TILE: i64 = 64;
/// Threads of a selection CTA (`NSA_DEC_SCORE_THREADS`).
const SCORE_THREADS: u32 = 256;
/// Threads per CTA (`NSA_THREADS`).
const THREADS: u32 = 128;
/// Most query heads per K/V head (four warps of 16 rows).
pub const DECODE_MAX_GROUP: i64 = 64;
/// Most blocks per token (`write_top_picks`: one lane per pick).
pub const DECODE_MAX_TOP_N: i64 = 32;
/// Largest value head size (four columns per thread of a 128-thread CTA: the combine kernel's
/// layout before it took up to 1,024 threads, kept as the contract).
pub const DECODE_MAX_DV: i64 = 4 * THREADS as i64;
/// Shared bytes of the top-n (`NSA_SELECT_WORK(warps)` unsigned long longs, select.cuh: one
/// list of 32 keys per warp).
const SELECT_WORK_BYTES: i64 = 8 * 32 * (SCORE_THREADS as i64 / 32);
/// The decode kernels of one device: `cmp` and `attend` indexed bf16 dk 64, 128, 192, then
/// fp32 (any dk); their warp-level forms (bf16, groups up to 16 heads) indexed
/// `3 · dk index + dv index` over [`MMA_HEAD_DIMS`]; `combine` bf16, fp32.
#[derive(Debug)]
struct DecodeTable {
    cmp: [CuFunction; 4],
    attend: [CuFunction; 4],
    cmp_warp: [CuFunction; 9],
    attend_warp: [CuFunction; 9],
    scores: CuFunction,
    combine: [CuFunction; 2],
    /// `nsa_dec_append` bf16, fp32 (append.rs).
    append: [CuFunction; 2],
    max_smem: i32,
    sm_count: i32,
    smem_per_sm: i32,
    /// Whether the device runs programmatic dependent launches (compute capability 9.0+).
    programmatic: bool,
}

/// The decode kernels loaded on one device.
#[derive(Debug)]
pub struct DecodeKernels {
    table: DecodeTable,
    device: usize,
}

// SAFETY: driver function handles of modules never unloaded, valid in the device's primary
// context from any thread; nothing is mutated after loading.
unsafe impl Send for DecodeKernels {}
// SAFETY: as above.
unsafe impl Sync for DecodeKernels {}

static LOADED: Mutex<Option<HashMap<usize, &'static DecodeKernels>>> = Mutex::new(None);

/// The decode kernels of CUDA device `device`, compiled (or read from the CUBIN cache) and
/// loaded on first use.
pub fn decode_kernels(device: usize) -> Result<&'static DecodeKernels, FusedError> {
    loaded_once(&LOADED, device, load)
}

fn load(device: usize, opts: &FusedOptions) -> Result<DecodeKernels, FusedError> {
    let setup = device_setup(device)?;
    let module = load_module(&cubin(&DECODE, setup.arch, opts)?.cubin)?;
    let func = |name: &str| module_function(module, name, setup.max_smem);
    let family = |prefix: &str| -> Result<[CuFunction; 4], FusedError> {
        Ok([
            func(&format!("{prefix}_bf16_dk64"))?,
            func(&format!("{prefix}_bf16_dk128"))?,
            func(&format!("{prefix}_bf16_dk192"))?,
            func(&format!("{prefix}_f32"))?,
        ])
    };
    let warp_family = |prefix: &str| -> Result<[CuFunction; 9], FusedError> {
        let mut fns = [std::ptr::null_mut(); 9];
        for (i, dk) in MMA_HEAD_DIMS.iter().enumerate() {
            for (j, dv) in MMA_HEAD_DIMS.iter().enumerate() {
                fns[3 * i + j] = func(&format!("{prefix}_warp_dk{dk}_dv{dv}"))?;
            }
        }
        Ok(fns)
    };
    let table = DecodeTable {
        cmp: family("nsa_dec_cmp")?,
        attend: family("nsa_dec_attend")?,
        cmp_warp: warp_family("nsa_dec_cmp")?,
        attend_warp: warp_family("nsa_dec_attend")?,
        scores: func("nsa_dec_scores")?,
        combine: [func("nsa_dec_combine_bf16")?, func("nsa_dec_combine_f32")?],
        append: [func("nsa_dec_append_bf16")?, func("nsa_dec_append_f32")?],
        max_smem: setup.max_smem,
        sm_count: setup.sm_count,
        smem_per_sm: setup.smem_per_sm,
        programmatic: setup.arch.0 >= 9,
    };
    Ok(DecodeKernels { table, device })
}

/// What one decode step attends: the new tokens' queries, the caches, positions and gates
/// (layouts in the module docs).
#[derive(Debug, Clone, Copy)]
pub struct DecodeInputs<'a> {
    pub q: &'a Tensor,
    pub cmp_k: &'a Tensor,
    pub cmp_v: &'a Tensor,
    pub raw_k: &'a Tensor,
    pub raw_v: &'a Tensor,
    /// The window ring `[B, Hkv, w, d]` (keys, values), or `None`: the window reads the raw
    /// buffer.
    pub window: Option<(&'a Tensor, &'a Tensor)>,
    pub positions: &'a Tensor,
    pub gates: &'a Tensor,
    /// Ticket counters int32 `[B, Hkv]` at zero, kept by the caller from step to step (the
    /// kernels leave them at zero), or `None`: the step allocates its own (one fill launch).
    pub tickets: Option<&'a Tensor>,
}

/// The step's lengths: selection's (`select`), the window `w`, the softmax scale and the
/// largest position any sequence will have while the step is used.
#[derive(Debug, Clone, Copy)]
pub struct DecodeParams<'a> {
    pub select: &'a SelectParams,
    pub window: i64,
    pub scale: f64,
    pub max_position: i64,
    /// The launches' shapes; the default is the device's own pick.
    pub launch: DecodeLaunch,
}

/// One launch of the decode kernels: grid x, threads per CTA, shared memory.
#[derive(Debug, Clone, Copy)]
struct Launch {
    grid_x: u32,
    threads: u32,
    smem: u32,
}

/// A decode step ready to launch (see the module docs).
#[derive(Debug)]
pub struct DecodeStep {
    kernels: &'static DecodeKernels,
    args: DecodeArgs,
    family: usize,
    /// The warp-level tile kernels' index, when the shape has them.
    warp: Option<usize>,
    grid_yz: (u32, u32),
    cmp: Launch,
    scores: Launch,
    attend: Launch,
    combine: Launch,
    /// The kernels after the first launch as programmatic dependents.
    programmatic: bool,
    inputs: [Tensor; 9],
    scratch: Scratch,
}

fn shape_err(what: &'static str, want: String, got: &Tensor) -> FusedError {
    input(what, format!("expected {want}, got {:?}", got.size()))
}

/// `t` must be a contiguous `kind` tensor on `like`'s device (of shape `size`, when given).
fn same_place(
    what: &'static str,
    t: &Tensor,
    like: &Tensor,
    kind: Kind,
    size: Option<&[i64]>,
) -> Result<(), FusedError> {
    let shaped = size.is_none_or(|size| t.size() == size);
    if t.device() != like.device() || t.kind() != kind || !t.is_contiguous() || !shaped {
        return Err(input(
            what,
            format!(
                "must be a contiguous {kind:?}{} tensor on {:?}, got {:?} {:?} on {:?}{}",
                size.map_or(String::new(), |s| format!(" {s:?}")),
                like.device(),
                t.kind(),
                t.size(),
                t.device(),
                if t.is_contiguous() {
                    ""
                } else {
                    " (not contiguous)"
                }
            ),
        ));
    }
    Ok(())
}

fn i32_of(what: &'static str, x: i64) -> Result<i32, FusedError> {
    i32::try_from(x).map_err(|_| input(what, format!("{x} exceeds i32")))
}

/// Compressed tokens visible to position `t` (Eq. 7).
fn visible(t: i64, l: i64, d: i64) -> i64 {
    if t + 1 < l {
        0
    } else {
        (t + 1 - l) / d + 1
    }
}

impl DecodeStep {
    /// Checks the inputs, allocates the workspace and outputs, and sizes the grids for
    /// positions up to `params.max_position`.
    pub fn new(x: DecodeInputs<'_>, params: DecodeParams<'_>) -> Result<Self, FusedError> {
        let q = x.q;
        let kind = q.kind();
        let family_base = match kind {
            Kind::BFloat16 => 0,
            Kind::Float => 3,
            k => {
                return Err(input(
                    "q",
                    format!("dtype {k:?}: the decode kernels take bf16 or float32"),
                ))
            }
        };
        let sz = q.size();
        let [b, hkv, hpg, dk] = sz[..] else {
            return Err(shape_err("q", "[B, Hkv, h, dk]".into(), q));
        };
        let dv = x.cmp_v.size().last().copied().unwrap_or(0);
        let mut tensors = vec![
            ("q", q),
            ("compressed keys", x.cmp_k),
            ("compressed values", x.cmp_v),
            ("raw keys", x.raw_k),
            ("raw values", x.raw_v),
            ("gates", x.gates),
        ];
        if let Some((k, v)) = x.window {
            tensors.push(("window keys", k));
            tensors.push(("window values", v));
        }
        for (what, t) in &tensors {
            same_place(what, t, q, kind, None)?;
        }
        let cache_shape = |what: &'static str, t: &Tensor, d: i64| -> Result<i64, FusedError> {
            match t.size()[..] {
                [tb, tg, slots, td] if tb == b && tg == hkv && td == d && slots >= 1 => Ok(slots),
                _ => Err(shape_err(what, format!("[{b}, {hkv}, slots, {d}]"), t)),
            }
        };
        let cap_cmp = cache_shape("compressed keys", x.cmp_k, dk)?;
        if cache_shape("compressed values", x.cmp_v, dv)? != cap_cmp {
            return Err(input("compressed values", "slots differ from the keys'"));
        }
        let cap_raw = cache_shape("raw keys", x.raw_k, dk)?;
        if cache_shape("raw values", x.raw_v, dv)? != cap_raw {
            return Err(input("raw values", "slots differ from the keys'"));
        }
        let w = params.window;
        let cap_win = match x.window {
            Some((k, v)) => {
                let slots = cache_shape("window keys", k, dk)?;
                if slots != w || cache_shape("window values", v, dv)? != w {
                    return Err(input(
                        "window",
                        format!("the ring must hold w = {w} slots, got {slots}"),
                    ));
                }
                w
            }
            None => 0,
        };
        if x.gates.size() != [b, hkv * hpg, 3] {
            return Err(shape_err(
                "gates",
                format!("[{b}, {}, 3]", hkv * hpg),
                x.gates,
            ));
        }
        let pos = x.positions;
        if pos.device() != q.device() || pos.kind() != Kind::Int64 || pos.size() != [b] {
            return Err(input(
                "positions",
                format!(
                    "int64 [{b}] on {:?}, got {:?} {:?} on {:?}",
                    q.device(),
                    pos.kind(),
                    pos.size(),
                    pos.device()
                ),
            ));
        }
        if !(1..=DECODE_MAX_GROUP).contains(&hpg) || b < 1 || hkv < 1 || dk < 1 || dv < 1 {
            return Err(input(
                "q",
                format!("need B, Hkv, dk, dv ≥ 1 and 1..={DECODE_MAX_GROUP} heads per group, got q {sz:?}, dv {dv}"),
            ));
        }
        let family = if kind == Kind::BFloat16 {
            let di = match dk {
                64 => 0,
                128 => 1,
                192 => 2,
                _ => {
                    return Err(input(
                        "q",
                        format!("bf16 decode kernels take dk in {{64, 128, 192}}, got {dk}"),
                    ))
                }
            };
            if dv % 16 != 0 {
                return Err(input(
                    "values",
                    format!("bf16 decode kernels need dv a multiple of 16, got {dv}"),
                ));
            }
            family_base + di
        } else {
            family_base
        };
        if dv % 4 != 0 || dv > DECODE_MAX_DV {
            return Err(input(
                "values",
                format!(
                    "the decode kernels need dv a multiple of 4 up to {DECODE_MAX_DV}, got {dv}"
                ),
            ));
        }
        let sel = params.select;
        let (l, d, lsel, n) = (sel.block_len, sel.stride, sel.select_len, sel.top_n);
        if l < 1 || d < 1 || lsel < 1 || w < 1 || !(1..=DECODE_MAX_TOP_N).contains(&n) {
            return Err(input(
                "params",
                format!("need l, d, l', w ≥ 1 and 1 ≤ n ≤ {DECODE_MAX_TOP_N}, got {sel:?}, w {w}"),
            ));
        }
        if sel.tap_weights.is_empty() || sel.tap_weights.len() > MAX_TAPS || sel.tap_step < 1 {
            return Err(input(
                "params",
                format!("1 to {MAX_TAPS} overlap taps with step ≥ 1, got {sel:?}"),
            ));
        }
        let launch = params.launch;
        if launch.tile_ctas.is_some_and(|c| c < 1) {
            return Err(input(
                "tile_ctas",
                format!("need at least 1 CTA, got {:?}", launch.tile_ctas),
            ));
        }
        if launch
            .select_slices
            .is_some_and(|c| !(1..=MAX_SELECT_SLICES).contains(&c))
        {
            return Err(input(
                "select_slices",
                format!(
                    "need 1 to {MAX_SELECT_SLICES} selection CTAs per group, got {:?}",
                    launch.select_slices
                ),
            ));
        }
        let t_max = params.max_position;
        if t_max < 0 || t_max >= cap_raw || visible(t_max, l, d) > cap_cmp {
            return Err(input(
                "max_position",
                format!(
                    "{t_max} does not fit the caches ({cap_raw} raw slots, {cap_cmp} compressed)"
                ),
            ));
        }
        // Every shape and value is checked above, on any device (tests run them on the CPU).
        let device = cuda_ordinal("q", q)?;
        let kernels = decode_kernels(device)?;
        let programmatic = match launch.programmatic {
            Some(true) if !kernels.table.programmatic => {
                return Err(input(
                    "programmatic",
                    "programmatic dependent launches need compute capability 9.0 or later",
                ))
            }
            Some(on) => on,
            None => kernels.table.programmatic,
        };
        let chunks_cmp = ((visible(t_max, l, d) + TILE - 1) / TILE).max(1);
        let nb = t_max / lsel + 1;
        let tpb = (lsel + TILE - 1) / TILE;
        let chunks_win = (w + TILE - 1) / TILE;
        // Shared memory (decode.cu's tiles_partial and dec_scores) and tiles per CTA.
        let (es, pad) = if kind == Kind::BFloat16 {
            (2, 8)
        } else {
            (4, 1)
        };
        let rows = (hpg + 15) / 16 * 16;
        let dim_index = |x: i64| MMA_HEAD_DIMS.iter().position(|&m| m == x);
        let warp = match (dim_index(dk), dim_index(dv)) {
            (Some(i), Some(j)) if kind == Kind::BFloat16 && hpg <= WARP_MAX_GROUP => {
                Some(3 * i + j)
            }
            _ => None,
        };
        let tile_smem = |multi: bool| {
            let stages = if multi { 2 } else { 1 };
            if warp.is_some() {
                return warp_tile_smem(dk, dv, stages);
            }
            let running = if multi { 4 * (rows * dv + 3 * rows) } else { 0 };
            es * ((rows + stages * TILE) * (dk + pad) + stages * TILE * (dv + pad))
                + 4 * rows * 65
                + running
        };
        let max_smem = i64::from(kernels.table.max_smem);
        let device_ctas = resident_ctas(
            tile_smem(true),
            max_smem,
            i64::from(kernels.table.sm_count),
            i64::from(kernels.table.smem_per_sm),
        );
        // A double-buffered CTA that does not fit the device takes one tile, whatever the ask.
        let resident = match launch.tile_ctas {
            Some(c) if device_ctas > 0 => c,
            _ => device_ctas,
        };
        let tpc_cmp = tiles_per_cta(chunks_cmp, b * hkv, resident);
        let tpc_att = branch_tiles_per_cta(n * tpb, chunks_win, b * hkv, resident);
        let parts_cmp = (chunks_cmp + tpc_cmp - 1) / tpc_cmp;
        let parts_slc = (n * tpb + tpc_att - 1) / tpc_att;
        let parts_win = (chunks_win + tpc_att - 1) / tpc_att;
        let parts = parts_cmp + parts_slc + parts_win;
        let (sel_slices, slice_blocks) = match launch.select_slices {
            Some(want) => slices_of(nb, want),
            None => select_slices(
                nb,
                b * hkv,
                i64::from(kernels.table.sm_count),
                i64::from(SCORE_THREADS),
            ),
        };
        let span = i64::from(SCORE_THREADS) * sel.tap_step + sel.tap_weights.len() as i64;
        // lse2 [64], the top-n's work, the p sums, the slice's block scores.
        let score_smem = 4 * (DECODE_MAX_GROUP + span + slice_blocks) + SELECT_WORK_BYTES;
        // Per part group and branch: the running sums [dv], then m, l and the weight.
        let (combine_groups, combine_threads) = combine_parts(parts, dv);
        let combine_smem = 4 * 3 * combine_groups * (dv + 3);
        for (what, bytes) in [
            ("tile kernels", tile_smem(false)),
            ("selection kernel", score_smem),
            ("combine kernel", combine_smem),
        ] {
            if bytes > max_smem {
                return Err(input(
                    "shape",
                    format!("the decode {what} need {bytes} bytes of shared memory, the device allows {max_smem}"),
                ));
            }
        }
        let mut w_taps = [0i32; MAX_TAPS];
        for (slot, &wt) in w_taps.iter_mut().zip(&sel.tap_weights) {
            *slot = i32_of("tap weight", wt)?;
        }
        let args = DecodeArgs {
            b: i32_of("B", b)?,
            hkv: i32_of("Hkv", hkv)?,
            hpg: hpg as i32,
            dk: i32_of("dk", dk)?,
            dv: i32_of("dv", dv)?,
            cl: i32_of("l", l)?,
            cd: i32_of("d", d)?,
            select_len: i32_of("l'", lsel)?,
            n: n as i32,
            n_local: i32_of("n_local", sel.n_local)?,
            w: i32_of("w", w)?,
            chunks_cmp: i32_of("compressed tiles", chunks_cmp)?,
            tpb: i32_of("tiles per block", tpb)?,
            chunks_win: i32_of("window tiles", chunks_win)?,
            nb: i32_of("selection blocks", nb)?,
            nc: i32_of("compressed tokens", chunks_cmp * TILE)?,
            tpc_cmp: i32_of("tiles per CTA", tpc_cmp)?,
            tpc_att: i32_of("tiles per CTA", tpc_att)?,
            parts_cmp: i32_of("partials", parts_cmp)?,
            parts_slc: i32_of("partials", parts_slc)?,
            parts_win: i32_of("partials", parts_win)?,
            sel_slices: sel_slices as i32,
            slice_blocks: i32_of("selection blocks", slice_blocks)?,
            cap_raw,
            cap_cmp,
            cap_win,
            scale_log2: (params.scale * std::f64::consts::LOG2_E) as f32,
            taps: Taps {
                first: i32_of("tap offset", sel.tap_first)?,
                step: i32_of("tap step", sel.tap_step)?,
                count: sel.tap_weights.len() as i32,
                w: w_taps,
            },
        };
        let grid = |what: &'static str, x: i64, smem: i64| -> Result<Launch, FusedError> {
            Ok(Launch {
                grid_x: u32::try_from(x).map_err(|_| input(what, format!("grid {x}")))?,
                threads: THREADS,
                smem: smem as u32,
            })
        };
        if b >= 65_536 || hkv >= 65_536 {
            return Err(input("q", format!("B {b} and Hkv {hkv} must be < 65536")));
        }
        let scratch = Scratch::new(
            ScratchShape {
                b,
                hkv,
                hpg,
                parts,
                score_width: chunks_cmp * TILE,
                slices: sel_slices,
                n,
                dv,
                kind,
            },
            q.device(),
            x.tickets,
        )?;
        let step = DecodeStep {
            kernels,
            args,
            family,
            warp,
            grid_yz: (hkv as u32, b as u32),
            cmp: grid("compressed tiles", parts_cmp, tile_smem(tpc_cmp > 1))?,
            scores: Launch {
                grid_x: sel_slices as u32,
                threads: SCORE_THREADS,
                smem: score_smem as u32,
            },
            attend: grid(
                "selected and window tiles",
                parts_slc + parts_win,
                tile_smem(tpc_att > 1),
            )?,
            combine: Launch {
                grid_x: hpg as u32,
                threads: combine_threads as u32,
                smem: combine_smem as u32,
            },
            programmatic,
            inputs: [
                q.shallow_clone(),
                x.cmp_k.shallow_clone(),
                x.cmp_v.shallow_clone(),
                x.raw_k.shallow_clone(),
                x.raw_v.shallow_clone(),
                x.window
                    .map_or_else(|| x.raw_k.shallow_clone(), |(k, _)| k.shallow_clone()),
                x.window
                    .map_or_else(|| x.raw_v.shallow_clone(), |(_, v)| v.shallow_clone()),
                pos.shallow_clone(),
                x.gates.shallow_clone(),
            ],
            scratch,
        };
        Ok(step)
    }

    /// The mixed output of the last launch, `[B, H, dv]`.
    pub fn output(&self) -> &Tensor {
        &self.scratch.out
    }

    /// The blocks the last launch selected, int64 `[B, Hkv, n]`.
    pub fn blocks(&self) -> &Tensor {
        &self.scratch.ids
    }

    /// Fills the step's own buffers (partial states, scores, the selection's lists and picks,
    /// the output; not the ticket counters) with values no kernel writes, so that a launch
    /// after it that reads an element it did not write first gives NaN or a wrong pick: the
    /// GPU check's proof that the buffers need no initialisation.
    pub fn poison_scratch(&self) -> Result<(), FusedError> {
        self.scratch.poison()
    }

    /// The launches' shapes (tiles per CTA, CTAs, selection slices).
    pub fn shape(&self) -> DecodeShape {
        DecodeShape::of(&self.args, self.programmatic)
    }

    /// Launches the four kernels on libtorch's current stream of the inputs' device.
    pub fn launch(&self) -> Result<(), FusedError> {
        let stream = current_stream(self.kernels.device)?;
        self.launch_on(stream, &mut |_| Ok(()))
    }

    /// The four launches on `stream`, `mark(i)` called before launch `i` (0 compressed tiles,
    /// 1 selection, 2 selected and window tiles, 3 combine) and `mark(4)` after the last.
    fn launch_on(
        &self,
        stream: CuStream,
        mark: &mut dyn FnMut(usize) -> Result<(), FusedError>,
    ) -> Result<(), FusedError> {
        let drv = driver::shared()?;
        let t = &self.kernels.table;
        let ptr = |x: &Tensor| x.data_ptr() as u64;
        let [q, ck, cv, rk, rv, wk, wv, pos, gates] = self.inputs.each_ref().map(ptr);
        let b = &self.scratch;
        let (ml, po, sc, lse, ids, out) = (
            ptr(&b.part_ml),
            ptr(&b.part_o),
            ptr(&b.scores),
            ptr(&b.lse2),
            ptr(&b.ids),
            ptr(&b.out),
        );
        let tickets = ptr(&b.tickets);
        let lists = ptr(&b.lists);
        let mut args = self.args;
        let arg = |x: &u64| x as *const u64 as *mut c_void;
        let args_ptr = &mut args as *mut DecodeArgs as *mut c_void;
        let (gy, gz) = self.grid_yz;
        // The first kernel waits for the work before it in the stream, as any launch does;
        // the others, launched as programmatic dependents, wait inside for the kernel before.
        let run = |f: CuFunction, l: Launch, dependent: bool, params: &mut [*mut c_void]| {
            let mut attr = LaunchAttribute::flag(
                LAUNCH_ATTR_PROGRAMMATIC_SERIALIZATION,
                dependent && self.programmatic,
            );
            let config = LaunchConfig {
                grid: [l.grid_x, gy, gz],
                block: [l.threads, 1, 1],
                shared_mem_bytes: l.smem,
                stream,
                attrs: &mut attr,
                num_attrs: 1,
            };
            // SAFETY: `f` is a loaded kernel whose parameter list is exactly `params` (pointers
            // to device addresses of live tensors this step owns, and the args struct, all alive
            // for the call; the driver copies them); `config` and its one attribute live for
            // the call; the grid and shared memory were checked against the device limits in
            // `new`, and the attribute is set only where the device has it.
            check("cuLaunchKernelEx", unsafe {
                (drv.launch_kernel_ex)(&config, f, params.as_mut_ptr(), std::ptr::null_mut())
            })
        };
        let combine = if self.family < 3 { 0 } else { 1 };
        let (cmp, attend) = match self.warp {
            Some(i) => (t.cmp_warp[i], t.attend_warp[i]),
            None => (t.cmp[self.family], t.attend[self.family]),
        };
        mark(0)?;
        run(
            cmp,
            self.cmp,
            false,
            &mut [
                arg(&q),
                arg(&ck),
                arg(&cv),
                arg(&pos),
                arg(&ml),
                arg(&po),
                arg(&sc),
                arg(&lse),
                arg(&tickets),
                args_ptr,
            ],
        )?;
        mark(1)?;
        run(
            t.scores,
            self.scores,
            true,
            &mut [
                arg(&pos),
                arg(&sc),
                arg(&lse),
                arg(&lists),
                arg(&tickets),
                arg(&ids),
                args_ptr,
            ],
        )?;
        mark(2)?;
        run(
            attend,
            self.attend,
            true,
            &mut [
                arg(&q),
                arg(&rk),
                arg(&rv),
                arg(&wk),
                arg(&wv),
                arg(&pos),
                arg(&ids),
                arg(&ml),
                arg(&po),
                args_ptr,
            ],
        )?;
        mark(3)?;
        run(
            t.combine[combine],
            self.combine,
            true,
            &mut [arg(&ml), arg(&po), arg(&gates), arg(&out), args_ptr],
        )?;
        mark(4)
    }
}

extern "C" {
    fn nsa_current_cuda_stream(
        device: i32,
        stream: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// libtorch's current CUDA stream of `device`.
fn current_stream(device: usize) -> Result<CuStream, FusedError> {
    let mut err = vec![0u8; ERR_LEN];
    let mut stream: *mut c_void = std::ptr::null_mut();
    // SAFETY: valid out-pointer and error buffer of ERR_LEN bytes; the glue catches exceptions.
    let rc = unsafe {
        nsa_current_cuda_stream(device as i32, &mut stream, err.as_mut_ptr().cast(), ERR_LEN)
    };
    if rc != 0 {
        return Err(glue_error("nsa_current_cuda_stream", &err).into());
    }
    Ok(stream)
}

mod append;
mod args;
mod graph;
mod grid;
mod scratch;
mod timing;
pub use append::{decode_append, AppendGates, AppendWrite, StepPrologue};
use args::{DecodeArgs, Taps, MAX_TAPS};
pub use graph::DecodeGraph;
use grid::{
    branch_tiles_per_cta, combine_parts, resident_ctas, select_slices, slices_of, tiles_per_cta,
    warp_tile_smem, MAX_SELECT_SLICES, WARP_MAX_GROUP,
};
pub use grid::{DecodeLaunch, DecodeShape, MAX_SELECT_SLICES as DECODE_MAX_SELECT_SLICES};
use scratch::{Scratch, ScratchShape};
pub use timing::DecodeKernelTimes;

#[cfg(test)]
mod tests;
