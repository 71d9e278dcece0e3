//! include/finetune.h must be what cbindgen generates from src/capi today.
//! Regenerate with `FINETUNE_UPDATE_HEADER=1 cargo test --test c_header`.

use std::path::Path;

#[test]
fn committed_header_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut generated = Vec::new();
    // Only src/capi (the module and its children) is read: nothing else in the crate is C ABI.
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi/mod.rs"))
        .generate()
        .expect("cbindgen reads src/capi")
        .write(&mut generated);
    let path = root.join("include/finetune.h");
    if std::env::var_os("FINETUNE_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("header written");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/finetune.h is stale: run `FINETUNE_UPDATE_HEADER=1 cargo test --test c_header` and commit it"
    );
}
