//! Link settings for libtorch from the project virtualenv (torch-sys finds it with
//! LIBTORCH_USE_PYTORCH=1): an rpath so binaries run without LD_LIBRARY_PATH, and libtorch_cuda
//! linked with --no-as-needed, which the linker would otherwise drop (CUDA then silently reports
//! unavailable). A GPU machine with its own torch 2.11.0 overrides the rpath with LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    let lib = std::path::Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=libtorch_cuda_linked");
    }
    println!("cargo::rustc-check-cfg=cfg(libtorch_cuda_linked)");
}
