//! Which stages share a device.

use super::{devices_in_parallel, sharing_a_device};

#[test]
fn workers_count_those_on_their_device() {
    let ids = ["GPU-a", "", "GPU-a", "GPU-b", ""];
    let counts: Vec<usize> = (0..ids.len()).map(|i| sharing_a_device(&ids, i)).collect();
    assert_eq!(counts, [2, 1, 2, 1, 1]);
}

#[test]
fn stages_on_one_gpu_count_as_one_device() {
    let gpu_a = "GPU-5f0e2b1a-9c33-4d07-8e61-00ff12345678";
    let gpu_b = "GPU-0a1b2c3d-0000-4000-8000-000000000001";
    let cases: &[(&[&str], usize)] = &[
        (&[], 1),
        (&[""], 1),
        (&["", ""], 2),
        (&[gpu_a], 1),
        (&[gpu_a, gpu_a], 1),
        (&[gpu_a, gpu_b], 2),
        (&[gpu_a, "", gpu_a], 2),
        (&[gpu_a, gpu_b, gpu_a, gpu_b], 2),
        (&["metal:mac:0", "", gpu_a, "metal:mac:0"], 3),
    ];
    for (ids, expected) in cases {
        assert_eq!(
            devices_in_parallel(ids.iter().copied()),
            *expected,
            "{ids:?}"
        );
    }
}
