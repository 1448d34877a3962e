//! C ABI of flashmla-rs (work in progress: implemented under issue 4).
