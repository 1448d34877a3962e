//! All data movement of a CLI run, in one place: host problem in, host outputs out, whatever device the backend
//! computes on.
//!
//! | backend device | path |
//! |---|---|
//! | `Device::Host` (cpu) | [`mla_cpu::problem::HostRun`]: descriptors over the host buffers, metadata, workspace, decode |
//! | `Device::Cuda(n)` (hopper) | [`crate::exec_cuda::CudaRun`]: inputs uploaded once, metadata and decode on the device's default stream, each decode timed with CUDA events, outputs downloaded |
//!
//! Decodes over FP8 caches ([`Fp8HostProblem`]) run through [`mla_cpu::fp8problem::Fp8HostRun`] on host backends;
//! a backend is first asked its workspace size, so one without FP8 support answers with its own `Unsupported`
//! error (docs/sparse-fp8.md: the Hopper backend, for now).

use std::time::{Duration, Instant};

use mla_core::{Device, MlaBackend};
use mla_cpu::fp8problem::{Fp8HostProblem, Fp8HostRun};
use mla_cpu::problem::{HostOutputs, HostProblem, HostRun};

use crate::args::CliResult;
use crate::cli_err;
#[cfg(feature = "cuda")]
use crate::exec_cuda::CudaRun;

/// A problem bound to a backend, ready to run (possibly many times, for timing).
pub struct Session<'a> {
    inner: Inner<'a>,
}

enum Inner<'a> {
    Host(HostRun<'a>),
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaRun<'a>>),
}

impl<'a> Session<'a> {
    /// Prepares `host` on `backend`: runs the scheduler step and allocates workspace and outputs.
    pub fn new(backend: &'a dyn MlaBackend, host: &'a HostProblem) -> CliResult<Self> {
        match backend.capabilities().device {
            Device::Host => Ok(Session { inner: Inner::Host(HostRun::new(backend, host)?) }),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Ok(Session { inner: Inner::Cuda(Box::new(CudaRun::new(backend, host, n)?)) }),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => Err(crate::cli_err!("device cuda:{n}: built without the `cuda` feature")),
        }
    }

    /// One decode call, returning when its outputs are complete.
    pub fn decode(&mut self) -> CliResult<Duration> {
        match &mut self.inner {
            Inner::Host(run) => {
                let t = Instant::now();
                run.decode()?;
                Ok(t.elapsed())
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(run) => run.decode(),
        }
    }

    /// The outputs of the last decode, on the host.
    pub fn outputs(&self) -> CliResult<HostOutputs> {
        match &self.inner {
            Inner::Host(run) => Ok(run.outputs()),
            #[cfg(feature = "cuda")]
            Inner::Cuda(run) => run.outputs(),
        }
    }
}

/// Runs `host` once on `backend` and returns its outputs.
pub fn run_decode(backend: &dyn MlaBackend, host: &HostProblem) -> CliResult<HostOutputs> {
    let mut s = Session::new(backend, host)?;
    s.decode()?;
    s.outputs()
}

/// Times of repeated decodes.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Every timed call, in order.
    pub samples: Vec<Duration>,
}

impl Timing {
    /// Median call time, seconds.
    pub fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
    }

    /// Fastest call, seconds.
    pub fn min(&self) -> f64 {
        self.samples.iter().map(Duration::as_secs_f64).fold(f64::INFINITY, f64::min)
    }
}

/// One warm-up call, then timed calls until at least `min_iters` calls and `min_secs` seconds (at most
/// `max_iters` calls).
fn time_calls(
    mut call: impl FnMut() -> CliResult<Duration>,
    min_iters: usize,
    max_iters: usize,
    min_secs: f64,
) -> CliResult<Timing> {
    call()?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < max_iters.max(1) && (samples.len() < min_iters || start.elapsed().as_secs_f64() < min_secs) {
        samples.push(call()?);
    }
    Ok(Timing { samples })
}

/// One warm-up call, then timed calls until at least `min_iters` calls and `min_secs` seconds (at most
/// `max_iters` calls). Returns the outputs of the last call.
pub fn time_decode(
    backend: &dyn MlaBackend,
    host: &HostProblem,
    min_iters: usize,
    max_iters: usize,
    min_secs: f64,
) -> CliResult<(HostOutputs, Timing)> {
    let mut s = Session::new(backend, host)?;
    let timing = time_calls(|| s.decode(), min_iters, max_iters, min_secs)?;
    Ok((s.outputs()?, timing))
}

/// Prepares a decode over FP8 caches on `backend` (metadata step, buffers).
pub fn fp8_session<'a>(backend: &'a dyn MlaBackend, host: &'a Fp8HostProblem) -> CliResult<Fp8HostRun<'a>> {
    // The backend's own answer comes first: one without FP8 support says so (`Error::Unsupported`), rather than
    // the runner's complaint about where buffers live.
    backend.fp8_workspace_size(&host.shape())?;
    match backend.capabilities().device {
        Device::Host => Ok(Fp8HostRun::new(backend, host)?),
        Device::Cuda(n) => Err(cli_err!(
            "backend `{}` on cuda:{n}: this tool runs decodes over FP8 caches on host backends only",
            backend.name()
        )),
    }
}

/// Runs a decode over FP8 caches once on `backend` and returns its outputs (out widened from bf16).
pub fn run_fp8(backend: &dyn MlaBackend, host: &Fp8HostProblem) -> CliResult<HostOutputs> {
    let mut run = fp8_session(backend, host)?;
    run.decode()?;
    Ok(run.outputs())
}

/// [`time_decode`] for a decode over FP8 caches.
pub fn time_fp8(
    backend: &dyn MlaBackend,
    host: &Fp8HostProblem,
    min_iters: usize,
    max_iters: usize,
    min_secs: f64,
) -> CliResult<(HostOutputs, Timing)> {
    let mut run = fp8_session(backend, host)?;
    let timing = time_calls(
        || {
            let t = Instant::now();
            run.decode()?;
            Ok(t.elapsed())
        },
        min_iters,
        max_iters,
        min_secs,
    )?;
    Ok((run.outputs(), timing))
}

#[cfg(test)]
mod tests {
    use mla_core::{
        Capabilities, DType, Fp8Capabilities, Fp8Layout, PageSizes, Result, ValidatedDecode, ValidatedMetadata,
    };
    use mla_cpu::fp8problem::{Fp8RandomSpec, SparseSpec};

    use super::*;

    /// A GPU backend without FP8 support, as the Hopper backend is today (docs/sparse-fp8.md); nothing but its
    /// capabilities is ever called.
    struct NoFp8(Capabilities);

    impl MlaBackend for NoFp8 {
        fn name(&self) -> &'static str {
            "gpu"
        }
        fn capabilities(&self) -> &Capabilities {
            &self.0
        }
        fn metadata_validated(&self, _v: &ValidatedMetadata, _s: mla_core::Stream) -> Result<()> {
            unreachable!("the FP8 path never calls the dense metadata step")
        }
        fn decode_validated(&self, _v: &ValidatedDecode, _s: mla_core::Stream) -> Result<()> {
            unreachable!("the FP8 path never calls the dense decode")
        }
    }

    #[test]
    fn a_backend_without_fp8_answers_with_its_own_unsupported_error() {
        let backend = NoFp8(Capabilities {
            backend: "gpu",
            device: Device::Cuda(0),
            device_name: "test GPU".into(),
            sm_count: 132,
            compute_capability: Some((9, 0)),
            dtypes: vec![DType::Bf16],
            head_dims: vec![Capabilities::MLA_HEAD_DIMS],
            page_sizes: PageSizes::Only(vec![64]),
            fp8: Fp8Capabilities::none(),
        });
        let p = Fp8HostProblem::random(&Fp8RandomSpec {
            layout: Fp8Layout::V32,
            batch: 1,
            s_q: 1,
            h_q: 4,
            page_size: 4,
            mean_seqlen: 8,
            varlen: false,
            sparse: Some(SparseSpec::new(4)),
            causal: false,
            seed: 0,
        })
        .unwrap();
        let err = run_fp8(&backend, &p).unwrap_err().to_string();
        assert_eq!(err, mla_core::sparse::unsupported("gpu").to_string());
        assert!(err.contains("not implemented by this backend yet") && err.contains("`cpu` backend"), "{err}");
    }
}
