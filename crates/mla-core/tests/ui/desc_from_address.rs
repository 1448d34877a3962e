//! A descriptor from an integer address (the SIGSEGV of issue 15, had it compiled).
#![forbid(unsafe_code)]
use mla_core::{Device, ScalarType, TensorDesc};

fn main() {
    let _ = TensorDesc::from_raw_contiguous(0x10 as *mut _, ScalarType::I32, &[4], Device::Host);
}
