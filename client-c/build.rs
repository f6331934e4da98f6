//! Gives the shared library its soname, so programs link against
//! `libmemsock.so.0` and a later compatible build can replace it.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmemsock.so.0");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
