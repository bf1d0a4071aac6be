//! Kiln's benchmarks: `cargo bench -p kiln-benches` runs the suite of `kiln bench` (kiln_models::suite), which
//! holds the timing, the ceilings and the multi-threaded CPU references.

pub use kiln_models::suite;
