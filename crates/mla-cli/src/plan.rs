//! `flashmla plan`: the scheduler's output for given sequence lengths.

use std::fmt::Write as _;

use mla_core::scheduler::{self, SchedulePlan};

use crate::args::{CliResult, PlanArgs};
use crate::{cli_err, npy};

/// Runs `flashmla plan`.
pub fn run(args: &PlanArgs) -> CliResult {
    let seqlens = match (&args.seqlens, &args.seqlens_file) {
        (Some(v), None) => v.clone(),
        (None, Some(f)) => {
            let (shape, v) = npy::read_indices(f)?;
            if shape.len() != 1 {
                return Err(cli_err!(
                    "--seqlens-file {}: expected a 1-D integer array, got shape {shape:?}",
                    f.display()
                ));
            }
            v
        }
        (Some(_), Some(_)) => return Err(cli_err!("--seqlens and --seqlens-file are exclusive; give one")),
        (None, None) => {
            return Err(cli_err!("--seqlens (comma-separated) or --seqlens-file (int32/int64 .npy) is required"));
        }
    };
    let (s_q, h_q, h_kv, num_sms, json) = (args.s_q, args.h_q, args.h_kv, args.num_sms, args.json);
    for (name, v) in [("s-q", s_q), ("h-q", h_q), ("h-kv", h_kv), ("num-sms", num_sms)] {
        if v == 0 {
            return Err(cli_err!("--{name}: expected a value >= 1, got 0"));
        }
    }
    if !h_q.is_multiple_of(h_kv) {
        return Err(cli_err!("--h-q: expected a multiple of --h-kv = {h_kv}, got {h_q}"));
    }
    if seqlens.is_empty() {
        return Err(cli_err!("--seqlens: expected at least one length, got none"));
    }
    let q_seq_per_hk = s_q * h_q / h_kv;
    let parts = scheduler::num_sm_parts(num_sms, q_seq_per_hk, h_kv);
    let plan = scheduler::plan(&seqlens, parts)?;
    print!("{}", if json { to_json(&plan) } else { to_table(&plan, &seqlens, q_seq_per_hk, h_kv) });
    Ok(())
}

/// The metadata as JSON.
#[derive(serde::Serialize)]
struct PlanJson {
    num_sm_parts: usize,
    /// One row of 8 words per part (docs/scheduler-metadata.md).
    tile_scheduler_metadata: Vec<[i32; 8]>,
    num_splits: Vec<i32>,
}

/// `{"num_sm_parts":P,"tile_scheduler_metadata":[[8 ints],...],"num_splits":[...]}` on one line.
pub fn to_json(plan: &SchedulePlan) -> String {
    let j = PlanJson {
        num_sm_parts: plan.parts.len(),
        tile_scheduler_metadata: plan.parts.iter().map(|p| p.to_words()).collect(),
        num_splits: plan.num_splits.clone(),
    };
    // Serialising plain integers and arrays cannot fail.
    serde_json::to_string(&j).expect("integers serialise") + "\n"
}

fn to_table(plan: &SchedulePlan, seqlens: &[i32], q_seq_per_hk: usize, h_kv: usize) -> String {
    let mut s = String::new();
    let m_blocks = q_seq_per_hk.div_ceil(scheduler::BLOCK_SIZE_M);
    let _ = writeln!(
        s,
        "{} requests, {} parts (grid {m_blocks} M tiles x {h_kv} KV heads x {} parts), {} splits",
        seqlens.len(),
        plan.parts.len(),
        plan.parts.len(),
        plan.total_splits()
    );
    let _ = writeln!(
        s,
        "{:>5} | {:>9} {:>7} {:>11} {:>9} {:>11} {:>7} {:>7}",
        "part", "begin_req", "end_req", "begin_block", "end_block", "begin_split", "first*", "last*"
    );
    for (i, p) in plan.parts.iter().enumerate() {
        if p.is_empty() {
            let _ = writeln!(s, "{i:>5} | (idle)");
            continue;
        }
        let _ = writeln!(
            s,
            "{i:>5} | {:>9} {:>7} {:>11} {:>9} {:>11} {:>7} {:>7}",
            p.begin_req,
            p.end_req,
            p.begin_block,
            p.end_block,
            p.begin_split,
            p.is_first_req_split,
            p.is_last_req_split
        );
    }
    let _ = writeln!(s, "* = request has more than one split");
    let _ = writeln!(s, "num_splits: {:?}", plan.num_splits);
    s
}
