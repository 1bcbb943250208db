//! Link settings for libtorch from the project virtualenv (torch-sys finds it with
//! LIBTORCH_USE_PYTORCH=1): an rpath so binaries run without LD_LIBRARY_PATH, and libtorch_cuda
//! linked with --no-as-needed, which the linker would otherwise drop (CUDA then silently reports
//! unavailable). A GPU machine with its own torch 2.11.0 overrides the rpath with LD_LIBRARY_PATH.
//!
//! Also compiles csrc/torch_shim.cpp (accelerator memory statistics and backward with an explicit
//! output gradient, which tch does not expose) against libtorch's headers, found beside its lib
//! folder (`<torch>/lib` -> `<torch>/include`), and links it with libtorch/libc10.
//!
//! And csrc/dist_shim.cpp (torch.distributed's TCPStore and Gloo process group): with Gloo
//! where Gloo's headers are found (`GLOO_INCLUDE_DIR`, `.venv/gloo/usr/include` from
//! scripts/gloo_headers.sh, or `/usr/include` with Debian's libgloo-dev; cfg `dist_gloo`),
//! without it otherwise (creating a Gloo group then says why).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/torch_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report libtorch (set LIBTORCH_USE_PYTORCH=1 with the project venv on PATH)")
    };
    let lib = std::path::Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=libtorch_cuda_linked");
    }
    println!("cargo::rustc-check-cfg=cfg(libtorch_cuda_linked)");
    println!("cargo::rustc-check-cfg=cfg(dist_gloo)");
    compile_shim(lib);
}

fn compile_shim(lib: &std::path::Path) {
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    if !include.join("ATen/DeviceAccelerator.h").exists() {
        panic!(
            "libtorch headers not found at {} (expected beside DEP_TCH_LIBTORCH_LIB={})",
            include.display(),
            lib.display()
        );
    }
    // PyTorch >= 2.7 wheels use the C++11 ABI; torch-sys reads the same variable.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .warnings(false);
        b
    };
    build().file("csrc/torch_shim.cpp").compile("vla_torch_shim");
    let mut dist = build();
    dist.file("csrc/dist_shim.cpp");
    if let Some(gloo) = gloo_include() {
        dist.include(gloo).define("VLA_HAVE_GLOO", None);
        println!("cargo:rustc-cfg=dist_gloo");
    } else {
        println!("cargo:warning=Gloo headers not found (run scripts/gloo_headers.sh .venv or install libgloo-dev): distributed training is disabled in this build");
    }
    dist.compile("vla_dist_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The folder holding `gloo/algorithm.h`, if any.
fn gloo_include() -> Option<std::path::PathBuf> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    std::env::var_os("GLOO_INCLUDE_DIR")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([manifest.join(".venv/gloo/usr/include"), std::path::PathBuf::from("/usr/include")])
        .find(|d| d.join("gloo/algorithm.h").exists())
}
