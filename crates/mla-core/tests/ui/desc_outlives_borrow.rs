//! A descriptor cannot outlive the slice its view borrows.
#![forbid(unsafe_code)]
use mla_core::{HostTensor, TensorDesc};

fn main() {
    let d: TensorDesc;
    {
        let v = vec![0i32; 4];
        d = HostTensor::new(&v, &[4]).unwrap().desc();
    }
    println!("{}", d.numel());
}
