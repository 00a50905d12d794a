//! Finds an installed libkloop with `pkg-config --libs kloop` and hands its
//! flags to the linker. Set PKG_CONFIG_PATH for a non-standard prefix (and
//! LD_LIBRARY_PATH to run the result from there).
use std::env;
use std::process::Command;

fn main() {
    for var in [
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={}", var);
    }
    println!("cargo:rerun-if-changed=build.rs");

    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let output = match Command::new(&pkg_config).args(["--libs", "kloop"]).output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run {}: {}", pkg_config, err),
    };
    if !output.status.success() {
        panic!(
            "`{} --libs kloop` failed: {}\nInstall libkloop (meson install) and point \
             PKG_CONFIG_PATH at <prefix>/<libdir>/pkgconfig.",
            pkg_config,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let flags = String::from_utf8(output.stdout).expect("pkg-config printed non-UTF-8");
    for flag in flags.split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={}", dir);
        } else if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo:rustc-link-lib={}", lib);
        } else {
            println!("cargo:rustc-link-arg={}", flag);
        }
    }
}
