//! Nothing to build: `protoc-bin-vendored` is a build dependency only so
//! that cargo downloads the protoc that `scripts/protoc` falls back on.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
