fn main() {
    println!("cargo::rustc-check-cfg=cfg(mla_no_kernels)");
    println!("cargo::rustc-cfg=mla_no_kernels");
}
