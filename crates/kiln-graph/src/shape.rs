//! Shape arithmetic shared by the GPU ops and the CPU reference.

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// numpy broadcasting of two shapes; `None` if they are incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Strides that read a tensor of `shape` as if broadcast to `target` (0 on broadcast axes).
pub fn broadcast_strides(shape: &[usize], target: &[usize]) -> Vec<usize> {
    let st = strides(shape);
    let off = target.len() - shape.len();
    (0..target.len()).map(|d| if d < off || shape[d - off] == 1 { 0 } else { st[d - off] }).collect()
}

/// Views `shape` as [outer, shape[axis], inner].
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]))
}
