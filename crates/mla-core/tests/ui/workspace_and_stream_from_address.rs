//! Workspaces and streams from raw values need `unsafe` too.
#![forbid(unsafe_code)]
use mla_core::{Device, Stream, Workspace};

fn main() {
    let _ = Workspace::from_raw(0x10 as *mut _, 1 << 20, Device::Host);
    let _ = Stream::from_raw(0x10 as *mut _);
}
