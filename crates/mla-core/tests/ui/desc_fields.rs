//! A descriptor's fields cannot be written or filled in: a safe view cannot be pointed elsewhere.
#![forbid(unsafe_code)]
use mla_core::HostTensor;

fn main() {
    let v = vec![0i32; 4];
    let mut d = HostTensor::new(&v, &[4]).unwrap().desc();
    d.data = 0x10 as *mut _;
    d.shape[0] = 1 << 40;
}
