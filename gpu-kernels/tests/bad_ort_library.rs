//! Loading ONNX Runtime from a file that is not a library fails cleanly and does not
//! poison the process-global runtime: a later load from the right path works.
//!
//! Its own test binary (so its own process): nothing has loaded ONNX Runtime before it.

mod common;

use baton_gpu_kernels::{Embedder, EmbedderConfig, Error};

#[test]
fn a_bad_library_is_an_error_and_a_good_one_still_loads_after_it() {
    let good = common::config(1);

    let bad = EmbedderConfig {
        // Exists, but is not a shared library.
        ort_dylib_path: good.tokenizer_path.clone(),
        ..good.clone()
    };
    let err = Embedder::load(&bad).unwrap_err();
    assert!(matches!(err, Error::OrtLibraryLoad { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("could not load the onnx runtime library"),
        "{err}"
    );

    let emb = Embedder::load(&good).expect("the real library loads after a failed attempt");
    assert_eq!(emb.embed(&["still works"]).unwrap()[0].len(), 384);
}
