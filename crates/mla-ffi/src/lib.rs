//! C ABI of flashmla-rs (the C entry points land under issue 4), and the backend registry shared with the CLI.

pub mod registry;

pub use registry::{BACKEND_NAMES, open_backend};
