//! The benchmarks' device-side pieces that only the timed runs use (so `infonce bench` on the
//! emulated device, which checks and does not time, never reaches them): the preset inputs filled
//! on the device by `steps_fill_unit_rows_<dtype>`.

mod support;

use fused_infonce::bench::Preset;
use fused_infonce::cuda::bench::PresetInputs;
use fused_infonce::Mode;

#[test]
fn device_filled_preset_inputs_are_seeded_unit_rows() {
    let Some(gpu) = support::gpu("device_filled_preset_inputs_are_seeded_unit_rows") else {
        return;
    };
    // A queue-mode shape whose row counts are not multiples of the kernel's 8 rows per block.
    let p = Preset {
        name: "small",
        mode: Mode::Queue,
        anchors: 13,
        keys: 301,
        dim: 37,
        tau: 0.2,
        learnable: false,
    };
    let one = PresetInputs::random(&gpu, &p, 5).unwrap();
    let again = PresetInputs::random(&gpu, &p, 5).unwrap();
    let other = PresetInputs::random(&gpu, &p, 6).unwrap();
    for (name, m, rows) in [("a", &one.a, 13), ("b", &one.b, 13), ("c", &one.c, 301)] {
        assert_eq!((m.rows(), m.cols()), (rows, 37), "{name}");
        let v = m.download(&gpu).unwrap();
        for (r, row) in v.chunks(37).enumerate() {
            let norm = row
                .iter()
                .map(|x| f64::from(x.to_f32()).powi(2))
                .sum::<f64>()
                .sqrt();
            // bf16 storage: each element within 2^-8 relative.
            assert!((norm - 1.0).abs() < 1e-2, "{name} row {r}: norm {norm}");
        }
    }
    let bits = |m: &fused_infonce::cuda::DeviceMatrix<fused_infonce::bf16>| {
        m.download(&gpu)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bits(&one.c),
        bits(&again.c),
        "the same seed gives the same rows"
    );
    assert_ne!(
        bits(&one.c),
        bits(&other.c),
        "another seed gives other rows"
    );
    assert_ne!(
        bits(&one.a),
        bits(&one.b),
        "the three inputs have their own seeds"
    );
}
