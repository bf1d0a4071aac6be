//! Shared timing helpers for Kiln's benchmarks: medians over repeated runs, and a CPU reference matmul
//! (blocked i-k-j loop, one thread per core) so each GPU figure stands beside what the machine's CPU gives.

use std::time::Instant;

/// Median of `runs` timings of `f` in milliseconds, after `warmup` untimed calls.
pub fn median_ms(warmup: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// C = A B for row-major f32 matrices: blocked i-k-j, rows split across the machine's cores.
pub fn cpu_matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    let threads = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1).min(m.max(1));
    let rows_per = m.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, chunk) in c.chunks_mut(rows_per * n).enumerate() {
            s.spawn(move || {
                chunk.fill(0.0);
                let r0 = t * rows_per;
                const KB: usize = 256;
                for kb in (0..k).step_by(KB) {
                    for (ri, row) in chunk.chunks_mut(n).enumerate() {
                        let arow = &a[(r0 + ri) * k..(r0 + ri + 1) * k];
                        for p in kb..(kb + KB).min(k) {
                            let av = arow[p];
                            let brow = &b[p * n..(p + 1) * n];
                            for (cv, bv) in row.iter_mut().zip(brow) {
                                *cv += av * bv;
                            }
                        }
                    }
                }
            });
        }
    });
}
