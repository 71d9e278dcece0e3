//! Every CUDA program in kernels/ compiles with NVRTC for the architectures the backend targets.
//! Needs only the NVRTC library, no GPU: scripts/test.sh installs it and sets
//! FINETUNE_REQUIRE_NVRTC=1; elsewhere the test skips (saying so) when NVRTC is absent.

use finetune::backend::cuda::kernels::{compile, nvrtc_present, PROGRAMS};

#[test]
fn every_kernel_program_compiles_for_hopper_and_ampere() {
    if !nvrtc_present() {
        assert!(
            std::env::var("FINETUNE_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "FINETUNE_REQUIRE_NVRTC=1 but libnvrtc.so was not found"
        );
        eprintln!("skipping: the CUDA runtime compiler (libnvrtc.so) is not installed");
        return;
    }
    for arch in ["sm_90a", "sm_90", "sm_80"] {
        for (name, _) in PROGRAMS {
            let cubin = compile(name, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{name} for {arch} is not an ELF CUBIN"
            );
            eprintln!("{name}.cu for {arch}: {} bytes", cubin.len());
        }
    }
}
