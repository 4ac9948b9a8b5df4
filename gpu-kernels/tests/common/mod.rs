//! Shared by the integration tests: where the model files are.

use std::path::PathBuf;

use baton_gpu_kernels::EmbedderConfig;

/// `$BATON_HOME`, or `<workspace>/.baton`.
pub fn baton_home() -> PathBuf {
    match std::env::var_os("BATON_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join(".baton"),
    }
}

/// The `.baton` layout's config (2 intra-op threads, the given pool size). Panics, failing
/// the test, when a file is missing: these tests must not pass without the model.
pub fn config(sessions: usize) -> EmbedderConfig {
    let home = baton_home();
    let cfg = EmbedderConfig {
        intra_threads: 2,
        sessions,
        ..EmbedderConfig::from_home(&home)
    };
    for path in [&cfg.model_path, &cfg.tokenizer_path, &cfg.ort_dylib_path] {
        assert!(
            path.is_file(),
            "{} is missing: run `cargo xtask setup` (or set BATON_HOME to a directory it set up)",
            path.display()
        );
    }
    cfg
}
