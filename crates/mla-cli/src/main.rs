//! The `flashmla` command-line tool.
fn main() {}
