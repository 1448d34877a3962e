//! Cross-crate integration tests of flashmla-rs (the files under `tests/`); their helpers (problems, the float64
//! reference, tolerances, `for_each_backend`) are the `mla-testkit` crate.
