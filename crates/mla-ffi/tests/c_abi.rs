//! The C ABI as C and C++ programs see it: compiles the programs under `tests/c/` and `tests/cpp/` and the
//! example of `docs/c-api.md` with the system compilers (`-Werror`), links them against the `libflashmla.so` that
//! this `cargo test` built, and runs them.
//!
//! | test | compiles | checks |
//! |---|---|---|
//! | `header_compiles_as_c99_and_cpp17` | a file that only includes `include/flashmla.h` | the header is clean C99 and C++17 |
//! | `c11_program` | `tests/c/abi_test.c` | scheduler + decode on the CPU backend vs. the closed form |
//! | `c11_fp8_program` | `tests/c/fp8_test.c` | ABI 2: quantisation and a sparse decode over an FP8 cache vs. its closed form |
//! | `cpp17_program` | `tests/cpp/abi_test.cpp` | the same from six threads sharing one handle |
//! | `docs_example_compiles_and_runs` | the C block of `docs/c-api.md` | the documented example compiles and is right |
//! | `exports_only_flashmla_symbols` | — | `nm -D` of the library |
//!
//! The programs link the cdylib that `common::library_path` builds (`-L` and `-Wl,-rpath`), exactly as an engine
//! links `libflashmla.so`.
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The directory holding the freshly built `libflashmla.so`.
fn deps_dir() -> PathBuf {
    common::library_path().parent().expect("the library has a directory").to_path_buf()
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c_abi");
    std::fs::create_dir_all(&dir).expect("create CARGO_TARGET_TMPDIR/c_abi");
    dir
}

/// The system C (or C++) compiler as the `cc` crate finds it (`CC`/`CXX` honoured). `tag` gives each caller its
/// own scratch directory, since the tests run in parallel and `cc` probes the compiler with files it writes there.
fn compiler(cpp: bool, tag: &str) -> Command {
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let scratch = out_dir().join(format!("cc-{tag}"));
    std::fs::create_dir_all(&scratch).expect("create the compiler scratch directory");
    cc::Build::new()
        .cargo_metadata(false)
        .cpp(cpp)
        .opt_level(1)
        .debug(false)
        .target(&target)
        .host(&target)
        .out_dir(scratch)
        .try_get_compiler()
        .expect("no C/C++ compiler found (install gcc/g++ or set CC/CXX)")
        .to_command()
}

fn run(mut cmd: Command, what: &str) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{cmd:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    stdout
}

/// Compiles `source` as language standard `std` (`c99`, `c11`, `c++17`) against `include/` (and `tests/c/` for the
/// shared problem) and links `libflashmla.so`.
fn build_program(source: &Path, exe_name: &str, std: &str) -> PathBuf {
    let root = repo_root();
    let deps = deps_dir();
    let exe = out_dir().join(exe_name);
    let cpp = std.starts_with("c++");
    let mut cmd = compiler(cpp, exe_name);
    cmd.arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("tests/c"))
        .arg(source)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&deps)
        .arg("-lflashmla")
        // A true RPATH (not RUNPATH) outranks LD_LIBRARY_PATH, which `cargo test` points at target/<profile>/deps
        // too: a stale libflashmla.so left there must not shadow the one just built.
        .arg("-Wl,--disable-new-dtags")
        .arg(format!("-Wl,-rpath,{}", deps.display()))
        .arg("-lm");
    if cpp {
        cmd.arg("-pthread");
    }
    run(cmd, &format!("compiling {}", source.display()));
    exe
}

#[test]
fn header_compiles_as_c99_and_cpp17() {
    let src = out_dir().join("header_only.c");
    std::fs::write(
        &src,
        "#include \"flashmla.h\"\n#include \"flashmla.h\" /* the include guard works */\n\
         int header_only(void);\nint header_only(void) { return FLASHMLA_ABI_VERSION + FLASHMLA_STATUS_OK; }\n",
    )
    .unwrap();
    let include = repo_root().join("include");
    for (cpp, std) in [(false, "-std=c99"), (false, "-std=c11"), (true, "-std=c++17")] {
        let mut cmd = compiler(cpp, &format!("header{std}"));
        if cpp {
            cmd.args(["-x", "c++"]);
        } else {
            cmd.args(["-Wstrict-prototypes", "-Wmissing-prototypes"]);
        }
        cmd.arg(std)
            .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-Wundef", "-Wconversion", "-fsyntax-only", "-I"])
            .arg(&include)
            .arg(&src);
        run(cmd, &format!("compiling include/flashmla.h as {std}"));
    }
}

#[test]
fn c11_program() {
    let exe = build_program(&repo_root().join("tests/c/abi_test.c"), "abi_test_c", "c11");
    let stdout = run(Command::new(exe), "tests/c/abi_test.c");
    assert!(stdout.contains("abi_test.c: ok"), "{stdout}");
}

#[test]
fn c11_fp8_program() {
    let exe = build_program(&repo_root().join("tests/c/fp8_test.c"), "fp8_test_c", "c11");
    let stdout = run(Command::new(exe), "tests/c/fp8_test.c");
    assert!(stdout.contains("fp8_test.c: ok"), "{stdout}");
}

#[test]
fn cpp17_program() {
    let exe = build_program(&repo_root().join("tests/cpp/abi_test.cpp"), "abi_test_cpp", "c++17");
    let stdout = run(Command::new(exe), "tests/cpp/abi_test.cpp");
    assert!(stdout.contains("abi_test.cpp: ok"), "{stdout}");
}

/// The first ```` ```c ```` block of `docs/c-api.md`.
fn docs_example() -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/c-api.md")).expect("docs/c-api.md");
    let start = doc.find("```c\n").expect("docs/c-api.md has a ```c block") + "```c\n".len();
    let len = doc[start..].find("\n```").expect("the ```c block is closed");
    doc[start..start + len + 1].to_owned()
}

#[test]
fn docs_example_compiles_and_runs() {
    let src = out_dir().join("c_api_example.c");
    std::fs::write(&src, docs_example()).unwrap();
    let exe = build_program(&src, "c_api_example", "c99");
    let stdout = run(Command::new(exe), "the example of docs/c-api.md");
    assert_eq!(stdout.matches("head ").count(), 2, "{stdout}");
}

#[test]
fn exports_only_flashmla_symbols() {
    let lib = deps_dir().join("libflashmla.so");
    let mut cmd = Command::new("nm");
    cmd.args(["-D", "--defined-only"]).arg(&lib);
    let listing = run(cmd, "nm -D (binutils)");
    let names: Vec<&str> = listing.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    let stray: Vec<&&str> = names.iter().filter(|n| !n.starts_with("flashmla_")).collect();
    assert!(stray.is_empty(), "libflashmla.so exports symbols without the flashmla_ prefix: {stray:?}");
    for f in common::ENTRY_POINTS.into_iter().chain(common::FP8_ENTRY_POINTS) {
        assert!(names.contains(&f), "{f} is not exported: {names:?}");
    }
}
