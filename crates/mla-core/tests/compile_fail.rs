//! Safe code cannot hand the library an address: the programs under `tests/ui/` build under
//! `#![forbid(unsafe_code)]` only if raw memory could enter without `unsafe`, so each must fail to compile with the
//! error recorded next to it.

#[test]
fn safe_code_cannot_hand_the_library_an_address() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
