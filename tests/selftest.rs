//! The start-up self-test (src/backend/selftest.rs) passes on every backend the golden checks run
//! on: the CPU variants, the CUDA kernels under CPU emulation, wgpu (lavapipe in CI), and CUDA
//! where a device exists. (Its failure path is tested in its own module, with a perturbed op.)

mod common;

use tern::backend::selftest;

#[test]
fn every_backend_passes_the_self_test() {
    let emulated = common::emulated_cuda_backends();
    for (name, mut backend) in common::backends().into_iter().chain(emulated) {
        let started = std::time::Instant::now();
        selftest::run(backend.as_mut()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        eprintln!("{name}: self-test passed in {:.1?}", started.elapsed());
    }
}
