//! The RMSNorm backward one chunk of rows at a time (`Backend::rmsnorm_backward_rows`, as the
//! decoder's MLP half runs it) against the whole call, on the CPU reference.

use finetune::backend::cpu::CpuBackend;
use finetune::backend::Backend;
use finetune::rng::Rng;

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * rng.normal()).collect()
}

#[test]
fn chunks_of_rows_add_up_to_the_whole_backward_bit_for_bit() {
    let be = CpuBackend::new(2).unwrap();
    let mut rng = Rng::new(5);
    let (tokens, hidden) = (37, 24);
    let x = be
        .upload(&randn(&mut rng, tokens * hidden, 1.0), tokens, hidden)
        .unwrap();
    let w = be.upload(&randn(&mut rng, hidden, 0.5), 1, hidden).unwrap();
    let dy_values = randn(&mut rng, tokens * hidden, 1.0);
    let dy = be.upload(&dy_values, tokens, hidden).unwrap();
    let carried = randn(&mut rng, tokens * hidden, 1.0);
    for unit_offset in [false, true] {
        let (_, r) = be.rmsnorm(&x, &w, 1e-5, unit_offset).unwrap();
        let acc = be.upload(&carried, tokens, hidden).unwrap();
        let whole = be
            .rmsnorm_backward(&dy, &x, &w, &r, unit_offset, Some(acc))
            .unwrap();
        let mut chunked = be.upload(&carried, tokens, hidden).unwrap();
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
    let x = be
        .upload(&randn(&mut rng, tokens * hidden, 1.0), tokens, hidden)
        .unwrap();
    let w = be.upload(&randn(&mut rng, hidden, 0.5), 1, hidden).unwrap();
    let (_, r) = be.rmsnorm(&x, &w, 1e-5, false).unwrap();
    let dy = be
        .upload(&randn(&mut rng, 3 * hidden, 1.0), 3, hidden)
        .unwrap();
    let mut acc = be.zeros(tokens, hidden).unwrap();
    let err = be
        .rmsnorm_backward_rows(&dy, &x, &w, &r, false, 6, &mut acc)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rmsnorm_backward") && err.contains("from row 6"),
        "{err}"
    );
    let mut small = be.zeros(tokens - 1, hidden).unwrap();
    let err = be
        .rmsnorm_backward_rows(&dy, &x, &w, &r, false, 0, &mut small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("accumulator"), "{err}");
}
