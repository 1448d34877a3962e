//! A writable descriptor (or workspace) cannot reach another thread: copies of it on two threads could be handed
//! to two concurrent calls writing the same memory.
#![forbid(unsafe_code)]
use mla_core::{HostTensorMut, Workspace};

fn main() {
    let mut out = vec![0f32; 4];
    let mut ws = vec![0f32; 4];
    let d = HostTensorMut::new(&mut out, &[4]).unwrap().desc();
    let w = Workspace::host(&mut ws);
    std::thread::scope(|s| {
        s.spawn(move || d.numel());
        s.spawn(|| w.bytes());
    });
}
