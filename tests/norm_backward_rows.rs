//! The RMSNorm backward one chunk of rows at a time (`Backend::rmsnorm_backward_rows`, as the
//! decoder's MLP half runs it) against the whole call, on the CPU reference.

use finetune::backend::cpu::CpuBackend;
use finetune::backend::Backend;
use finetune::rng::Rng;

type Tensor = <CpuBackend as Backend>::Tensor;

/// A random `[rows, cols]` matrix of standard deviation `std`.
fn randn(be: &CpuBackend, rng: &mut Rng, rows: usize, cols: usize, std: f32) -> Tensor {
    let values: Vec<f32> = (0..rows * cols).map(|_| std * rng.normal()).collect();
    be.upload(&values, rows, cols).unwrap()
}

#[test]
fn chunks_of_rows_add_up_to_the_whole_backward_bit_for_bit() {
    let be = CpuBackend::new(2).unwrap();
    let mut rng = Rng::new(5);
    let (tokens, hidden) = (37, 24);
    let x = randn(&be, &mut rng, tokens, hidden, 1.0);
    let w = randn(&be, &mut rng, 1, hidden, 0.5);
    let dy = randn(&be, &mut rng, tokens, hidden, 1.0);
    let carried = randn(&be, &mut rng, tokens, hidden, 1.0);
    for unit_offset in [false, true] {
        let (_, r) = be.rmsnorm(&x, &w, 1e-5, unit_offset).unwrap();
        let acc = be.duplicate(&carried).unwrap();
        let whole = be
            .rmsnorm_backward(&dy, &x, &w, &r, unit_offset, Some(acc))
            .unwrap();
        let mut chunked = be.duplicate(&carried).unwrap();
        for (start, n) in [(0, 16), (16, 16), (32, 5)] {
            let part = be.copy_rows(&dy, start, n).unwrap();
            be.rmsnorm_backward_rows(&part, &x, &w, &r, unit_offset, start, &mut chunked)
                .unwrap();
        }
        assert_eq!(
            be.download(&chunked).unwrap(),
            be.download(&whole).unwrap(),
            "unit_offset {unit_offset}"
        );
    }
}

#[test]
fn rows_past_the_input_are_an_error() {
    let be = CpuBackend::new(1).unwrap();
    let mut rng = Rng::new(6);
    let (tokens, hidden) = (8, 4);
    let x = randn(&be, &mut rng, tokens, hidden, 1.0);
    let w = randn(&be, &mut rng, 1, hidden, 0.5);
    let (_, r) = be.rmsnorm(&x, &w, 1e-5, false).unwrap();
    let dy = randn(&be, &mut rng, 3, hidden, 1.0);
    let mut acc = be.zeros(tokens, hidden).unwrap();
    let err = be
        .rmsnorm_backward_rows(&dy, &x, &w, &r, false, 6, &mut acc)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rmsnorm_backward") && err.contains("rows 6..9"),
        "{err}"
    );
    let mut small = be.zeros(tokens - 1, hidden).unwrap();
    let err = be
        .rmsnorm_backward_rows(&dy, &x, &w, &r, false, 0, &mut small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("accumulator"), "{err}");
}
