//! The CUDA kernels (`kernels.cu`), compiled at run time by NVRTC and launched with cudarc.
//!
//! Nothing here is linked against CUDA: the driver (libcuda) and NVRTC (libnvrtc) are loaded
//! when first used, so the crate builds and its tests run on machines without them, where
//! [`Gpu::new`] is a clean `Err(Error::NoGpu(..))`. Each method mirrors a CPU twin and takes
//! and returns host memory; the data of one call stays on the device for the whole call
//! (an SGD epoch uploads once, runs every mini-batch on the device, and downloads once).

// Kernel launches and a few NVRTC calls are `unsafe` in cudarc; each use says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::Error;
use crate::compute::{check_head, check_pool, check_rows, check_topk};
use crate::device::{self, DeviceInfo, guarded};
use crate::head::{LinearHead, sgd_epoch_cpu, validate_sgd};

/// The CUDA C source of every kernel.
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

/// Threads per block; `kernels.cu`'s `BLOCK` must match (its reductions assume it).
const BLOCK: u32 = 256;
/// Most blocks launched for a grid-stride kernel.
const MAX_BLOCKS: usize = 1 << 20;
/// Most floats in `cosine_topk`'s similarity scratch buffer (256 MiB); queries are
/// processed in chunks that fit.
const MAX_SIMS: usize = 1 << 26;
/// CUDA's limit on grid.y.
const MAX_GRID_Y: usize = 65_535;
/// `cosine_sims` stages a query row in shared memory: at most 48 KiB without opt-in.
pub const MAX_COSINE_DIM: usize = 48 * 1024 / 4;

/// Every kernel `kernels.cu` defines.
const KERNEL_NAMES: [&str; 7] = [
    "mean_pool_normalize",
    "cosine_sims",
    "topk_rows",
    "softmax_rows",
    "head_forward",
    "sgd_batch_delta",
    "sgd_apply",
];

struct Kernels {
    pool: CudaFunction,
    cosine_sims: CudaFunction,
    topk_rows: CudaFunction,
    softmax_rows: CudaFunction,
    head_forward: CudaFunction,
    sgd_batch_delta: CudaFunction,
    sgd_apply: CudaFunction,
}

/// A CUDA device with Baton's kernels loaded: the GPU twin of the CPU kernels.
///
/// `Send + Sync`; calls are serialised on one stream (share it behind an `Arc`, or use
/// [`Gpu::shared`]).
pub struct Gpu {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    stream: Arc<CudaStream>,
    kernels: Kernels,
    /// Keeps the module loaded for the life of the functions.
    _module: Arc<CudaModule>,
    /// One call at a time: each call is upload, launches, download on `stream`.
    lock: Mutex<()>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish_non_exhaustive()
    }
}

fn drv(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| Error::Gpu(format!("{what}: {e:?}"))
}

/// `v` as a kernel `int`, or a shape error naming it.
fn int(v: usize, what: &str) -> Result<i32, Error> {
    i32::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernels' i32 range")))
}

/// A launch of `blocks` blocks of [`BLOCK`] threads.
fn blocks(blocks: usize, shared_mem_bytes: u32) -> Result<LaunchConfig, Error> {
    let g = u32::try_from(blocks)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::Shape(format!("{blocks} blocks exceed CUDA's grid limit")))?;
    Ok(LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes,
    })
}

/// A grid-stride launch covering `elements`.
fn elementwise(elements: usize) -> LaunchConfig {
    let g = elements.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Is NVRTC (libnvrtc.so) loadable?
fn nvrtc_present() -> bool {
    // SAFETY: only dlopens NVRTC under its usual names and closes it; guarded against panics.
    guarded("looking for libnvrtc", || {
        Ok(unsafe { cudarc::nvrtc::sys::is_culib_present() })
    })
    .unwrap_or(false)
}

/// NVRTC's version, when it is loadable.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    guarded("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion writes two ints through valid pointers.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| format!("{e:?}"))?;
        Ok((major, minor))
    })
    .ok()
}

/// The CUDA driver's version (e.g. 13000 for 13.0), when the driver is loadable.
fn driver_version() -> Option<i32> {
    if !device::driver_library_present() {
        return None;
    }
    guarded("cuDriverGetVersion", || {
        let mut v = 0;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| format!("{e:?}"))?;
        Ok(v)
    })
    .ok()
}

/// PTX already compiled in this process, by target architecture ("" for NVRTC's default).
static PTX_CACHE: Mutex<Vec<(String, Ptx)>> = Mutex::new(Vec::new());

fn compile_ptx_cached(arch: Option<&str>) -> Result<Ptx, Error> {
    let key = arch.unwrap_or("").to_string();
    let mut cache = PTX_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, ptx)) = cache.iter().find(|(a, _)| *a == key) {
        return Ok(ptx.clone());
    }
    if !nvrtc_present() {
        return Err(Error::NoGpu(
            "NVRTC (libnvrtc.so) is not installed or not loadable; it compiles the kernels".into(),
        ));
    }
    let opts = CompileOptions {
        options: arch
            .map(|a| vec![format!("--gpu-architecture={a}")])
            .unwrap_or_default(),
        name: Some("baton_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = guarded("compiling the kernels with NVRTC", || {
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS_SOURCE, opts).map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError {
                nvrtc,
                options,
                log,
            } => format!(
                "{nvrtc:?} with options {options:?}:\n{}",
                log.to_string_lossy()
            ),
            other => format!("{other:?}"),
        })
    })
    .map_err(Error::KernelCompile)?;
    cache.push((key, ptx.clone()));
    Ok(ptx)
}

/// The kernels compiled to PTX by NVRTC for `arch` (e.g. `"compute_90"`; `None`: NVRTC's
/// default), without needing a GPU. For diagnostics and for checking the source compiles on
/// a machine that has NVRTC but no GPU. `Err(Error::NoGpu)` when NVRTC is not loadable.
pub fn kernels_ptx(arch: Option<&str>) -> Result<String, Error> {
    let ptx = compile_ptx_cached(arch)?;
    guarded("reading the PTX", || Ok(ptx.to_src())).map_err(Error::KernelCompile)
}

/// The kernels compiled by NVRTC to a CUBIN for `arch` (e.g. `"sm_90"`): machine code that
/// needs no PTX JIT in the driver (used when the driver rejects the PTX, e.g. PTX from a
/// newer NVRTC than the driver).
fn compile_cubin(arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    let src = std::ffi::CString::new(KERNELS_SOURCE).expect("the kernel source has no NUL");
    guarded("compiling a CUBIN with NVRTC", || {
        let prog = result::create_program(&src, Some(c"baton_kernels.cu"))
            .map_err(|e| format!("{e:?}"))?;
        let options = [format!("--gpu-architecture={arch}")];
        // SAFETY: `prog` was just created and is destroyed once, below; `src` outlives it.
        let compiled = unsafe { result::compile_program(prog, &options) };
        let out = match compiled {
            Err(e) => {
                // SAFETY: `prog` is live.
                let log = unsafe { result::get_program_log(prog) }
                    .ok()
                    .map(|raw| {
                        // SAFETY: NVRTC's log is a NUL-terminated string.
                        unsafe { CStr::from_ptr(raw.as_ptr()) }
                            .to_string_lossy()
                            .into_owned()
                    })
                    .unwrap_or_default();
                Err(format!("{e:?} with options {options:?}:\n{log}"))
            }
            Ok(()) => {
                let mut size = 0usize;
                // SAFETY: `prog` is live and compiled; NVRTC writes the size, then exactly
                // `size` bytes into a buffer of that size.
                unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                    .result()
                    .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))
                    .and_then(|()| {
                        let mut buf = vec![0u8; size];
                        unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }
                            .result()
                            .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
                        Ok(buf)
                    })
            }
        };
        // SAFETY: `prog` is live and not used after this.
        let _ = unsafe { result::destroy_program(prog) };
        out
    })
}

/// Compiles (once per process and architecture) and loads the kernels into `ctx`.
fn load_kernels(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Arc<CudaModule>, Error> {
    let arch = format!("compute_{}{}", cc.0, cc.1);
    let ptx = match compile_ptx_cached(Some(&arch)) {
        Ok(ptx) => ptx,
        Err(Error::KernelCompile(e)) => {
            // Typically an NVRTC older than the device: its default target still JITs.
            tracing::warn!(%arch, error = %e, "NVRTC cannot target the device; compiling for its default");
            compile_ptx_cached(None)?
        }
        Err(e) => return Err(e),
    };
    let ptx_err = match guarded("loading the PTX", || {
        ctx.load_module(ptx).map_err(|e| format!("{e:?}"))
    }) {
        Ok(module) => return Ok(module),
        Err(e) => e,
    };
    let sm = format!("sm_{}{}", cc.0, cc.1);
    tracing::warn!(
        error = %ptx_err,
        nvrtc = ?nvrtc_version(),
        driver = ?driver_version(),
        "the driver rejected the PTX; trying a {sm} CUBIN"
    );
    let cubin_err = match compile_cubin(&sm).and_then(|cubin| {
        guarded("loading the CUBIN", || {
            ctx.load_module(Ptx::from_binary(cubin))
                .map_err(|e| format!("{e:?}"))
        })
    }) {
        Ok(module) => return Ok(module),
        Err(e) => e,
    };
    Err(Error::Gpu(format!(
        "the driver (version {:?}) loaded neither the PTX from NVRTC {:?} ({ptx_err}) nor a {sm} CUBIN ({cubin_err}); \
         use an NVRTC no newer than the driver",
        driver_version(),
        nvrtc_version()
    )))
}

/// The [`Gpu`]s opened by [`Gpu::shared`].
static SHARED: Mutex<Vec<(usize, Arc<Gpu>)>> = Mutex::new(Vec::new());

impl Gpu {
    /// Opens device `ordinal` and loads the kernels, compiling them with NVRTC for its compute
    /// capability (once per process). `Err(Error::NoGpu(reason))` when there is no driver, no
    /// such device or no NVRTC; never panics.
    pub fn new(ordinal: usize) -> Result<Gpu, Error> {
        let ctx = device::context(ordinal).map_err(Error::NoGpu)?;
        if !nvrtc_present() {
            return Err(Error::NoGpu(
                "NVRTC (libnvrtc.so) is not installed or not loadable; it compiles the kernels"
                    .into(),
            ));
        }
        let (name, cc) = guarded("querying the device", || {
            let name = ctx.name().map_err(|e| format!("{e:?}"))?;
            let cc = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
            Ok((name, cc))
        })
        .map_err(Error::Gpu)?;
        let module = load_kernels(&ctx, cc)?;
        let load = |n: &str| {
            module
                .load_function(n)
                .map_err(|e| Error::Gpu(format!("kernel {n}: {e:?}")))
        };
        let kernels = Kernels {
            pool: load(KERNEL_NAMES[0])?,
            cosine_sims: load(KERNEL_NAMES[1])?,
            topk_rows: load(KERNEL_NAMES[2])?,
            softmax_rows: load(KERNEL_NAMES[3])?,
            head_forward: load(KERNEL_NAMES[4])?,
            sgd_batch_delta: load(KERNEL_NAMES[5])?,
            sgd_apply: load(KERNEL_NAMES[6])?,
        };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        tracing::info!(ordinal, %name, ?cc, "CUDA kernels loaded");
        Ok(Gpu {
            ordinal,
            name,
            compute_capability: cc,
            stream,
            kernels,
            _module: module,
            lock: Mutex::new(()),
        })
    }

    /// The process-wide [`Gpu`] for `ordinal`, opened on first use (later calls are cheap).
    /// Failures are not cached.
    pub fn shared(ordinal: usize) -> Result<Arc<Gpu>, Error> {
        let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, gpu)) = shared.iter().find(|(o, _)| *o == ordinal) {
            return Ok(gpu.clone());
        }
        let gpu = Arc::new(Gpu::new(ordinal)?);
        shared.push((ordinal, gpu.clone()));
        Ok(gpu)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's compute capability, (major, minor); (9, 0) on an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Fresh device facts (free memory now) for admission.
    pub fn info(&self) -> DeviceInfo {
        device::probe_ordinal(self.ordinal)
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// GPU twin of [`mean_pool_normalize`](crate::mean_pool_normalize), with shape errors as
    /// `Err(Error::Shape)`.
    pub fn mean_pool_normalize(
        &self,
        hidden: &[f32],
        mask: &[i64],
        batch: usize,
        seq: usize,
        dim: usize,
    ) -> Result<Vec<Vec<f32>>, Error> {
        check_pool(hidden, mask, batch, seq, dim)?;
        if batch == 0 || seq == 0 || dim == 0 {
            return Ok(vec![vec![0.0; dim]; batch]);
        }
        let (seq_i, dim_i) = (int(seq, "seq")?, int(dim, "dim")?);
        int(batch, "batch")?;
        let cfg = blocks(batch, 0)?;
        let _g = self.guard();
        let s = &self.stream;
        let hidden_d = s.clone_htod(hidden).map_err(drv("uploading hidden"))?;
        let mask_d = s.clone_htod(mask).map_err(drv("uploading mask"))?;
        let mut out_d = s
            .alloc_zeros::<f32>(batch * dim)
            .map_err(drv("allocating the output"))?;
        let mut launch = s.launch_builder(&self.kernels.pool);
        launch
            .arg(&hidden_d)
            .arg(&mask_d)
            .arg(&mut out_d)
            .arg(&seq_i)
            .arg(&dim_i);
        // SAFETY: mean_pool_normalize(const float*, const long long*, float*, int, int): the
        // arguments match; hidden_d holds batch*seq*dim floats, mask_d batch*seq i64 and out_d
        // batch*dim floats, and the kernel reads/writes only those for blockIdx.x < batch.
        unsafe { launch.launch(cfg) }.map_err(drv("launching mean_pool_normalize"))?;
        let out = s
            .clone_dtoh(&out_d)
            .map_err(drv("downloading the output"))?;
        Ok(out.chunks_exact(dim).map(<[f32]>::to_vec).collect())
    }

    /// GPU twin of [`cosine_topk_cpu`](crate::cosine_topk_cpu) (same order and tie-breaking),
    /// with shape errors as `Err(Error::Shape)`. `dim` is at most [`MAX_COSINE_DIM`].
    pub fn cosine_topk(
        &self,
        queries: &[f32],
        corpus: &[f32],
        dim: usize,
        k: usize,
    ) -> Result<Vec<Vec<(usize, f32)>>, Error> {
        check_topk(queries, corpus, dim)?;
        if dim > MAX_COSINE_DIM {
            return Err(Error::Shape(format!(
                "dim = {dim} exceeds the GPU cosine kernel's {MAX_COSINE_DIM}"
            )));
        }
        let (q, n) = (queries.len() / dim, corpus.len() / dim);
        let k = k.min(n);
        if q == 0 {
            return Ok(Vec::new());
        }
        if k == 0 {
            return Ok(vec![Vec::new(); q]);
        }
        let (n_i, k_i, dim_i) = (int(n, "n")?, int(k, "k")?, int(dim, "dim")?);
        int(q, "q")?;
        let chunk = (MAX_SIMS / n).clamp(1, MAX_GRID_Y).min(q);
        let _g = self.guard();
        let s = &self.stream;
        let queries_d = s.clone_htod(queries).map_err(drv("uploading queries"))?;
        let corpus_d = s.clone_htod(corpus).map_err(drv("uploading corpus"))?;
        let mut sims_d = s
            .alloc_zeros::<f32>(chunk * n)
            .map_err(drv("allocating similarities"))?;
        let mut taken_d = s
            .alloc_zeros::<u8>(chunk * n)
            .map_err(drv("allocating top-k flags"))?;
        let mut idx_d = s
            .alloc_zeros::<i32>(chunk * k)
            .map_err(drv("allocating top-k"))?;
        let mut val_d = s
            .alloc_zeros::<f32>(chunk * k)
            .map_err(drv("allocating top-k"))?;
        let mut out = Vec::with_capacity(q);
        for q0 in (0..q).step_by(chunk) {
            let rows = chunk.min(q - q0);
            let q0_i = int(q0, "query offset")?;
            s.memset_zeros(&mut taken_d)
                .map_err(drv("clearing top-k flags"))?;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(BLOCK as usize) as u32, rows as u32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: (dim * 4) as u32,
            };
            let mut launch = s.launch_builder(&self.kernels.cosine_sims);
            launch
                .arg(&queries_d)
                .arg(&corpus_d)
                .arg(&mut sims_d)
                .arg(&q0_i)
                .arg(&n_i)
                .arg(&dim_i);
            // SAFETY: cosine_sims(const float*, const float*, float*, int, int, int): the
            // arguments match; rows (grid.y) <= chunk, so it reads query rows q0..q0+rows < q
            // and writes sims rows < chunk of n floats; j < n is checked; the dynamic shared
            // memory holds dim floats (dim <= MAX_COSINE_DIM fits the 48 KiB default).
            unsafe { launch.launch(cfg) }.map_err(drv("launching cosine_sims"))?;
            let mut launch = s.launch_builder(&self.kernels.topk_rows);
            launch
                .arg(&sims_d)
                .arg(&mut taken_d)
                .arg(&mut idx_d)
                .arg(&mut val_d)
                .arg(&n_i)
                .arg(&k_i);
            // SAFETY: topk_rows(const float*, unsigned char*, int*, float*, int, int): the
            // arguments match; one block per row < rows <= chunk, each touching n sims and
            // flags and k outputs of its own row; 1 <= k <= n so every round finds an index.
            unsafe { launch.launch(blocks(rows, 0)?) }.map_err(drv("launching topk_rows"))?;
            let idx = s.clone_dtoh(&idx_d).map_err(drv("downloading top-k"))?;
            let val = s.clone_dtoh(&val_d).map_err(drv("downloading top-k"))?;
            for r in 0..rows {
                let row = r * k..(r + 1) * k;
                out.push(
                    idx[row.clone()]
                        .iter()
                        .zip(&val[row])
                        .map(|(&i, &v)| (i as usize, v))
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    /// GPU twin of [`softmax_rows_cpu`](crate::softmax_rows_cpu), with shape errors as
    /// `Err(Error::Shape)`.
    pub fn softmax_rows(&self, x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
        check_rows(x, rows, cols)?;
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let cols_i = int(cols, "cols")?;
        let cfg = blocks(rows, 0)?;
        let _g = self.guard();
        let s = &self.stream;
        let x_d = s.clone_htod(x).map_err(drv("uploading x"))?;
        let mut y_d = s.alloc_zeros::<f32>(x.len()).map_err(drv("allocating y"))?;
        let mut launch = s.launch_builder(&self.kernels.softmax_rows);
        launch.arg(&x_d).arg(&mut y_d).arg(&cols_i);
        // SAFETY: softmax_rows(const float*, float*, int): the arguments match; one block
        // per row < rows, each touching the cols values of its row in x_d and y_d.
        unsafe { launch.launch(cfg) }.map_err(drv("launching softmax_rows"))?;
        s.clone_dtoh(&y_d).map_err(drv("downloading y"))
    }

    /// GPU twin of [`head_forward_cpu`](crate::head_forward_cpu): logits `n × classes`, with
    /// shape errors as `Err(Error::Shape)`.
    pub fn head_forward(&self, head: &LinearHead, xs: &[f32], n: usize) -> Result<Vec<f32>, Error> {
        check_head(head, xs, n)?;
        let classes = head.classes();
        if n == 0 || classes == 0 {
            return Ok(Vec::new());
        }
        if head.dim == 0 {
            return Ok(head.bias.repeat(n));
        }
        let (n_i, c_i, d_i) = (
            int(n, "n")?,
            int(classes, "classes")?,
            int(head.dim, "dim")?,
        );
        let _g = self.guard();
        let s = &self.stream;
        let w_d = s
            .clone_htod(&head.weights)
            .map_err(drv("uploading weights"))?;
        let b_d = s.clone_htod(&head.bias).map_err(drv("uploading bias"))?;
        let xs_d = s.clone_htod(xs).map_err(drv("uploading xs"))?;
        let mut out_d = s
            .alloc_zeros::<f32>(n * classes)
            .map_err(drv("allocating logits"))?;
        let mut launch = s.launch_builder(&self.kernels.head_forward);
        launch
            .arg(&w_d)
            .arg(&b_d)
            .arg(&xs_d)
            .arg(&mut out_d)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&d_i);
        // SAFETY: head_forward(const float*, const float*, const float*, float*, int, int,
        // int): the arguments match; it writes e < n*classes and reads rows c < classes of
        // w_d (classes*dim), b_d (classes) and rows i < n of xs_d (n*dim).
        unsafe { launch.launch(elementwise(n * classes)) }
            .map_err(drv("launching head_forward"))?;
        s.clone_dtoh(&out_d).map_err(drv("downloading logits"))
    }

    /// GPU twin of [`sgd_epoch_cpu`](crate::sgd_epoch_cpu) (same semantics: mini-batches in
    /// `order`, mean cross-entropy gradient, mean loss of the epoch), with argument errors as
    /// `Err(Error::Shape)`. The data, the parameters and the per-sample losses stay on the
    /// device for the whole epoch; on `Err` the head is unchanged.
    pub fn sgd_epoch(
        &self,
        head: &mut LinearHead,
        xs: &[f32],
        ys: &[usize],
        order: &[usize],
        lr: f32,
        batch: usize,
    ) -> Result<f32, Error> {
        validate_sgd(head, xs, ys, order, batch).map_err(Error::Shape)?;
        let n = ys.len();
        if n == 0 {
            return Ok(0.0);
        }
        if head.dim == 0 {
            // Only biases to train: not worth a device round trip.
            return Ok(sgd_epoch_cpu(head, xs, ys, order, lr, batch));
        }
        let classes = head.classes();
        let (c_i, d_i) = (int(classes, "classes")?, int(head.dim, "dim")?);
        int(n, "n")?;
        let batch = batch.min(n);
        let ys_i: Vec<i32> = ys.iter().map(|&y| y as i32).collect(); // y < classes <= i32::MAX
        let order_i: Vec<i32> = order.iter().map(|&i| i as i32).collect(); // i < n <= i32::MAX
        let params = classes * head.dim + classes;
        let _g = self.guard();
        let s = &self.stream;
        let mut w_d = s
            .clone_htod(&head.weights)
            .map_err(drv("uploading weights"))?;
        let mut b_d = s.clone_htod(&head.bias).map_err(drv("uploading bias"))?;
        let xs_d = s.clone_htod(xs).map_err(drv("uploading xs"))?;
        let ys_d = s.clone_htod(&ys_i).map_err(drv("uploading ys"))?;
        let order_d = s.clone_htod(&order_i).map_err(drv("uploading order"))?;
        let mut probs_d = s
            .alloc_zeros::<f32>(batch * classes)
            .map_err(drv("allocating probabilities"))?;
        let mut delta_d = s
            .alloc_zeros::<f32>(batch * classes)
            .map_err(drv("allocating gradients"))?;
        let mut losses_d = s.alloc_zeros::<f32>(n).map_err(drv("allocating losses"))?;
        for start in (0..n).step_by(batch) {
            let m = batch.min(n - start);
            let (start_i, m_i) = (start as i32, m as i32); // both <= n <= i32::MAX
            let mut launch = s.launch_builder(&self.kernels.sgd_batch_delta);
            launch
                .arg(&w_d)
                .arg(&b_d)
                .arg(&xs_d)
                .arg(&ys_d)
                .arg(&order_d)
                .arg(&mut probs_d)
                .arg(&mut delta_d)
                .arg(&mut losses_d)
                .arg(&start_i)
                .arg(&m_i)
                .arg(&c_i)
                .arg(&d_i);
            // SAFETY: sgd_batch_delta(const float* w, const float* bias, const float* xs,
            // const int* ys, const int* order, float* probs, float* delta, float* losses,
            // int start, int m, int classes, int dim): the arguments match; block t < m <=
            // batch touches probs/delta row t (batch*classes each), losses[start+t] (< n),
            // order[start+t] (< n, a valid sample) and that sample's xs row and ys entry.
            unsafe { launch.launch(blocks(m, 0)?) }.map_err(drv("launching sgd_batch_delta"))?;
            let lr_f = lr;
            let mut launch = s.launch_builder(&self.kernels.sgd_apply);
            launch
                .arg(&mut w_d)
                .arg(&mut b_d)
                .arg(&xs_d)
                .arg(&order_d)
                .arg(&delta_d)
                .arg(&lr_f)
                .arg(&start_i)
                .arg(&m_i)
                .arg(&c_i)
                .arg(&d_i);
            // SAFETY: sgd_apply(float* w, float* bias, const float* xs, const int* order,
            // const float* delta, float lr, int start, int m, int classes, int dim): the
            // arguments match; thread e < classes*dim + classes updates one weight or bias
            // and reads delta rows t < m and the xs rows of order[start+t] < n.
            unsafe { launch.launch(elementwise(params)) }.map_err(drv("launching sgd_apply"))?;
        }
        let weights = s.clone_dtoh(&w_d).map_err(drv("downloading weights"))?;
        let bias = s.clone_dtoh(&b_d).map_err(drv("downloading bias"))?;
        let losses = s.clone_dtoh(&losses_d).map_err(drv("downloading losses"))?;
        head.weights = weights;
        head.bias = bias;
        Ok((losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_defines_every_kernel() {
        for name in KERNEL_NAMES {
            assert!(
                KERNELS_SOURCE.contains(&format!("extern \"C\" __global__ void {name}(")),
                "{name} missing from kernels.cu"
            );
        }
        assert!(KERNELS_SOURCE.contains(&format!("#define BLOCK {BLOCK}")));
    }

    #[test]
    fn a_cubin_compiles_when_nvrtc_is_installed() {
        if nvrtc_version().is_none() {
            println!("skipped: NVRTC (libnvrtc.so) not loadable");
            return;
        }
        let cubin = compile_cubin("sm_90").expect("the kernels compile to a cubin");
        assert_eq!(&cubin[..4], b"\x7fELF");
        let err = compile_cubin("sm_1").expect_err("no such architecture");
        assert!(err.contains("sm_1"), "{err}");
    }

    #[test]
    fn gpu_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Gpu>();
    }
}
