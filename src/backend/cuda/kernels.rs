//! The CUDA C sources of `kernels/`, compiled by NVRTC at first use for the GPU's own architecture
//! and cached on disk as CUBIN, keyed by a hash of the source, the options and the architecture.
//!
//! Each program is `kernels/prelude.cuh` followed by one `.cu` file; NVRTC runs with no include
//! path, so the sources include no header.

use super::device::{driver_error, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const PRELUDE: &str = include_str!("../../../kernels/prelude.cuh");

/// The programs: (name, source after the prelude).
pub const PROGRAMS: [(&str, &str); 7] = [
    ("pointwise", include_str!("../../../kernels/pointwise.cu")),
    ("norm", include_str!("../../../kernels/norm.cu")),
    ("rope", include_str!("../../../kernels/rope.cu")),
    ("loss", include_str!("../../../kernels/loss.cu")),
    ("attention", include_str!("../../../kernels/attention.cu")),
    ("flash", include_str!("../../../kernels/flash.cu")),
    ("nf4", include_str!("../../../kernels/nf4.cu")),
];

/// NVRTC options besides the architecture.
const OPTIONS: [&str; 1] = ["-std=c++17"];

/// The full source of program `name`: the embedded sources, or with `FINETUNE_KERNEL_DIR` set,
/// `prelude.cuh` and `{name}.cu` read from that directory (to try kernel changes without
/// rebuilding the library).
fn program_source(name: &str) -> Result<String> {
    let (_, body) = PROGRAMS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| Error::Device(format!("no kernel program named {name:?}")))?;
    let (prelude, body) = match std::env::var_os("FINETUNE_KERNEL_DIR") {
        Some(dir) => {
            let read = |file: String| {
                let path = PathBuf::from(&dir).join(file);
                std::fs::read_to_string(&path).map_err(|e| Error::io(path, e))
            };
            (read("prelude.cuh".into())?, read(format!("{name}.cu"))?)
        }
        None => (PRELUDE.to_string(), body.to_string()),
    };
    Ok(format!("{prelude}\n#line 1 \"{name}.cu\"\n{body}"))
}

/// True when the NVRTC library can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the shared library.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// Compiles program `name` for `arch` ("sm_90a", "sm_80") to CUBIN. Needs only the NVRTC
/// library, no GPU.
pub fn compile(name: &str, arch: &str) -> Result<Vec<u8>> {
    if !nvrtc_present() {
        return Err(Error::Device(
            "the CUDA runtime compiler library (libnvrtc.so) was not found; install the CUDA \
             runtime compiler (e.g. the nvidia-cuda-nvrtc package) or put it on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let src = CString::new(program_source(name)?).expect("kernel sources hold no NUL");
    let cname = CString::new(format!("{name}.cu")).expect("program names hold no NUL");
    let fail =
        |what: &str, e: nvrtc::NvrtcError| Error::Device(format!("{name}.cu: {what}: {e:?}"));
    let prog = nvrtc::create_program(&src, Some(&cname)).map_err(|e| fail("creating", e))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|o| o.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    // SAFETY: `prog` is a live program until destroyed at the end of this block.
    let result = unsafe {
        let compiled = nvrtc::compile_program(prog, &options);
        let out = match compiled {
            Ok(()) => cubin(prog).map_err(|e| fail("reading the CUBIN", e)),
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                        String::from_utf8_lossy(&bytes)
                            .trim_end_matches('\0')
                            .to_string()
                    })
                    .unwrap_or_default();
                Err(Error::Device(format!(
                    "compiling {name}.cu for {arch} failed ({e:?}):\n{log}"
                )))
            }
        };
        let _ = nvrtc::destroy_program(prog);
        out
    };
    result
}

/// The CUBIN of a compiled program.
///
/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>, nvrtc::NvrtcError> {
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
    let mut buf = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char).result()?;
    Ok(buf)
}

/// FNV-1a, 64 bits: a stable key for the on-disk cache (not for security).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain([0u8].iter()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Where compiled kernels are cached: `$FINETUNE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/finetune`
/// or `~/.cache/finetune`, each + `/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FINETUNE_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("finetune").join("kernels"))
}

/// Loaded modules and functions of one GPU, compiled (or read from the cache) on first use.
pub struct KernelCache {
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

/// The compilation target of a GPU of compute capability `major.minor`: "sm_90a" on Hopper
/// (its architecture-specific features: the warpgroup products of kernels/flash.cu), else
/// "sm_{major}{minor}".
pub fn target_arch(major: i32, minor: i32) -> String {
    let specific = if (major, minor) == (9, 0) { "a" } else { "" };
    format!("sm_{major}{minor}{specific}")
}

/// Whether kernels compiled for `arch` run the attention on warpgroup products (then each
/// kernel takes more shared memory: `flash_shared` in mod.rs).
pub fn warpgroup_products(arch: &str) -> bool {
    arch == "sm_90a"
}

impl KernelCache {
    pub fn new(gpu: &Gpu) -> Self {
        let (major, minor) = gpu.capability;
        KernelCache {
            arch: target_arch(major, minor),
            modules: Mutex::default(),
            functions: Mutex::default(),
        }
    }

    /// The architecture the kernels are compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Kernel `function` of program `program`.
    pub fn function(
        &self,
        gpu: &Gpu,
        program: &'static str,
        function: &'static str,
    ) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .expect("no panic holds it")
            .get(function)
        {
            return Ok(f.clone());
        }
        let module = self.module(gpu, program)?;
        let f = module
            .load_function(function)
            .map_err(driver_error(function))?;
        self.functions
            .lock()
            .expect("no panic holds it")
            .insert(function, f.clone());
        Ok(f)
    }

    fn module(&self, gpu: &Gpu, program: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().expect("no panic holds it");
        if let Some(m) = modules.get(program) {
            return Ok(m.clone());
        }
        let image = cached_cubin(program, &self.arch)?;
        let m = gpu
            .ctx
            .load_module(Ptx::from_binary(image))
            .map_err(driver_error(program))?;
        modules.insert(program, m.clone());
        Ok(m)
    }
}

/// The CUBIN of `program` for `arch` from the disk cache, or compiled now and stored there. A
/// cache that cannot be written only costs a compilation next time.
pub fn cached_cubin(program: &str, arch: &str) -> Result<Vec<u8>> {
    let src = program_source(program)?;
    let key = fnv1a(&[&src, &OPTIONS.join(" "), arch]);
    let path = cache_dir().map(|d| d.join(format!("{program}-{arch}-{key:016x}.cubin")));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let image = compile(program, arch)?;
    if let Some(p) = path {
        let stored = p.parent().map(std::fs::create_dir_all);
        if matches!(stored, Some(Ok(()))) {
            let _ = crate::io::atomic::write_atomic(&p, |f| std::io::Write::write_all(f, &image));
        }
    }
    Ok(image)
}

/// Compiles every program for `arch` into the disk cache ahead of first use (installers, CI
/// images); returns the cache directory.
pub fn precompile(arch: &str) -> Result<PathBuf> {
    let dir = cache_dir().ok_or_else(|| {
        Error::InvalidArgument("no cache directory: set FINETUNE_KERNEL_CACHE or HOME".into())
    })?;
    std::thread::scope(|s| {
        let jobs: Vec<_> = PROGRAMS
            .iter()
            .map(|(name, _)| s.spawn(move || cached_cubin(name, arch)))
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().expect("compilation does not panic").map(|_| ()))
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_alone_compiles_for_its_specific_target() {
        assert_eq!(target_arch(9, 0), "sm_90a");
        for ((major, minor), arch) in [((8, 0), "sm_80"), ((8, 9), "sm_89"), ((10, 0), "sm_100")] {
            assert_eq!(target_arch(major, minor), arch);
            assert!(!warpgroup_products(arch), "{arch}");
        }
        assert!(warpgroup_products(&target_arch(9, 0)));
        assert!(!warpgroup_products("sm_90"));
    }
}
