//! A recurrent layer's pass over its steps as one op: the input projections of every step come in (xg = x
//! W_ih^T + b_ih, one product outside), the states of every step go out. Fused (shaders/recurrent.wgsl), a step
//! is the recurrent matmul h W_hh^T and one cell kernel, and the backward pass one cell kernel and dgates W_hh
//! per step, then one product for W_hh's gradient over all steps. The composed form (the same equations in
//! ordinary ops) runs when fusion is off and under `backward_create_graph`.
//!
//! The op's output holds the state at every step boundary: [T + 1, slot], a slot being h [n, H] then c [n, H]
//! (LSTM), padded so that each slot's h starts at an offset a kernel can bind. [`rnn_sequence`] slices the
//! outputs and the final state out of it.

use kiln_wgpu::BufView;

use crate::backprop::Op;
use crate::error::{KilnError, Result};
use crate::kernels::{self, BiasAct};
use crate::tensor::{DType, Tensor};

/// A recurrent cell, with PyTorch's equations and gate order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CellKind {
    /// Elman RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh).
    Tanh,
    /// LSTM, gates i, f, g, o (`nn.LSTM`): c' = f c + i g, h' = o tanh(c').
    Lstm,
    /// GRU, gates r, z, n: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h (`nn.GRU`).
    Gru,
}

impl CellKind {
    /// Gate blocks stacked in the weights: 1, 4 or 3.
    pub fn gates(self) -> usize {
        match self {
            CellKind::Tanh => 1,
            CellKind::Lstm => 4,
            CellKind::Gru => 3,
        }
    }
    /// States carried between steps: h, and c for an LSTM.
    pub fn states(self) -> usize {
        if self == CellKind::Lstm {
            2
        } else {
            1
        }
    }
    /// recurrent.wgsl's KIND.
    pub(crate) fn code(self) -> u32 {
        match self {
            CellKind::Tanh => 0,
            CellKind::Lstm => 1,
            CellKind::Gru => 2,
        }
    }
    /// Saved activations per row of the fused forward: none for tanh (h is in the states; one block is kept
    /// so the buffer is never empty), i f g o for an LSTM, r z n and W_hn h + b_hn for a GRU.
    pub(crate) fn acts_width(self, hidden: usize) -> usize {
        match self {
            CellKind::Tanh => hidden,
            CellKind::Lstm | CellKind::Gru => 4 * hidden,
        }
    }
}

/// The geometry of one pass: T steps of n sequences, hidden size H, forward or reversed in time; `slot` floats
/// per state slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqGeom {
    pub kind: CellKind,
    pub steps: usize,
    pub n: usize,
    pub hidden: usize,
    pub reverse: bool,
    pub slot: usize,
}

impl SeqGeom {
    fn new(kind: CellKind, steps: usize, n: usize, hidden: usize, reverse: bool, dev: &kiln_wgpu::Gpu) -> SeqGeom {
        let slot = round_to_binding(kind.states() * n * hidden, dev);
        SeqGeom { kind, steps, n, hidden, reverse, slot }
    }
    /// Steps in the order they run.
    pub fn order(&self) -> Vec<usize> {
        if self.reverse {
            (0..self.steps).rev().collect()
        } else {
            (0..self.steps).collect()
        }
    }
    /// The slot of the state before step t, and after it. Slots are in time order either way: forward, step t
    /// goes from slot t to t + 1; reversed, from t + 1 to t.
    pub fn slots(&self, t: usize) -> (usize, usize) {
        if self.reverse {
            (t + 1, t)
        } else {
            (t, t + 1)
        }
    }
    /// The initial state's slot and the final state's.
    pub fn ends(&self) -> (usize, usize) {
        if self.reverse {
            (self.steps, 0)
        } else {
            (0, self.steps)
        }
    }
    /// The first of the T slots holding each step's output in time order.
    pub fn first_output(&self) -> usize {
        if self.reverse {
            0
        } else {
            1
        }
    }
    fn nh(&self) -> usize {
        self.n * self.hidden
    }
    fn gh(&self) -> usize {
        self.kind.gates() * self.hidden
    }
}

/// `n` floats rounded up so that consecutive blocks start at offsets the adapter can bind.
fn round_to_binding(n: usize, dev: &kiln_wgpu::Gpu) -> usize {
    let align = (dev.limits.min_storage_buffer_offset_alignment as usize / 4).max(4);
    n.div_ceil(align).max(1) * align
}

/// What the fused op keeps for its backward rule.
pub struct RnnSaved {
    pub geom: SeqGeom,
    pub xg: Tensor,
    pub w_hh: Tensor,
    pub b_hh: Tensor,
    pub h0: Tensor,
    pub c0: Option<Tensor>,
    pub lengths: Option<Vec<usize>>,
    /// The forward kernel's saved activations [T, n, A] (recurrent.wgsl).
    pub acts: BufView,
    /// lengths as u32 (a one-value placeholder without them).
    pub lens: BufView,
}

impl RnnSaved {
    pub fn inputs(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.xg, &self.w_hh, &self.b_hh, &self.h0];
        v.extend(self.c0.as_ref());
        v
    }
}

/// A pass's results: the state h at every step in time order [T, n, H] (past a sequence's length, held at its
/// last step: multiply by the mask for PyTorch's zero outputs), the final h [n, H] and, for an LSTM, c.
#[derive(Clone, Debug)]
pub struct RnnSequence {
    pub outputs: Tensor,
    pub h_last: Tensor,
    pub c_last: Option<Tensor>,
}

/// One layer and direction of a recurrent net over its T steps (fused on the GPU unless fusion is off).
/// xg [T * n, G * H]: every step's input projection x W_ih^T + b_ih; w_hh [G * H, H]; b_hh [G * H]; h0 (and
/// c0 for an LSTM) [n, H]; `lengths` (each at most T) for a padded batch, where a sequence's state is held past
/// its end; `reverse` runs from step T - 1 down to 0.
#[allow(clippy::too_many_arguments)]
pub fn rnn_sequence(kind: CellKind, xg: &Tensor, w_hh: &Tensor, b_hh: &Tensor, h0: &Tensor, c0: Option<&Tensor>, lengths: Option<&[usize]>, reverse: bool) -> Result<RnnSequence> {
    let geom = check(kind, xg, w_hh, b_hh, h0, c0, lengths, reverse)?;
    let states = if crate::fusion_enabled(xg.device()) { fused_states(&geom, xg, w_hh, b_hh, h0, c0, lengths)? } else { composed_states(&geom, xg, w_hh, b_hh, h0, c0, lengths)? };
    split_states(&geom, &states)
}

/// [`rnn_sequence`] with the composed ops whatever the fusion setting (benchmarks and tests compare the two).
#[allow(clippy::too_many_arguments)]
pub fn rnn_sequence_composed(kind: CellKind, xg: &Tensor, w_hh: &Tensor, b_hh: &Tensor, h0: &Tensor, c0: Option<&Tensor>, lengths: Option<&[usize]>, reverse: bool) -> Result<RnnSequence> {
    let geom = check(kind, xg, w_hh, b_hh, h0, c0, lengths, reverse)?;
    split_states(&geom, &composed_states(&geom, xg, w_hh, b_hh, h0, c0, lengths)?)
}

#[allow(clippy::too_many_arguments)]
fn check(kind: CellKind, xg: &Tensor, w_hh: &Tensor, b_hh: &Tensor, h0: &Tensor, c0: Option<&Tensor>, lengths: Option<&[usize]>, reverse: bool) -> Result<SeqGeom> {
    for t in [xg, w_hh, b_hh, h0].into_iter().chain(c0) {
        t.expect_dtype("rnn_sequence", DType::F32)?;
    }
    let bad = |lhs: &[usize], rhs: &[usize], detail: String| Err(KilnError::Shape { op: "rnn_sequence", lhs: lhs.to_vec(), rhs: rhs.to_vec(), detail });
    if h0.rank() != 2 {
        return bad(h0.shape(), w_hh.shape(), ": h0 must be [n, hidden]".into());
    }
    let (n, hidden) = (h0.shape()[0], h0.shape()[1]);
    let gh = kind.gates() * hidden;
    if w_hh.shape() != [gh, hidden] || b_hh.shape() != [gh] {
        return bad(w_hh.shape(), b_hh.shape(), format!(": for hidden size {hidden}, w_hh must be [{gh}, {hidden}] and b_hh [{gh}]"));
    }
    if xg.rank() != 2 || xg.shape()[1] != gh || n == 0 || !xg.shape()[0].is_multiple_of(n) {
        return bad(xg.shape(), h0.shape(), format!(": xg must be [steps * {n}, {gh}], the input projections of every step"));
    }
    if (kind == CellKind::Lstm) != c0.is_some() || c0.is_some_and(|c| c.shape() != h0.shape()) {
        return bad(h0.shape(), c0.map(|c| c.shape()).unwrap_or(&[]), ": an LSTM takes c0 of h0's shape; the other cells none".into());
    }
    let steps = xg.shape()[0] / n;
    if let Some(l) = lengths {
        if l.len() != n || l.iter().any(|&len| len > steps) {
            return bad(xg.shape(), &[l.len()], format!(": lengths {l:?}: one per sequence, each at most the {steps} steps"));
        }
    }
    Ok(SeqGeom::new(kind, steps, n, hidden, reverse, xg.device()))
}

/// The outputs and final states, sliced from the states [T + 1, slot].
fn split_states(g: &SeqGeom, states: &Tensor) -> Result<RnnSequence> {
    let (nh, (_, last)) = (g.nh(), g.ends());
    let outputs = states.slice(0, g.first_output(), g.steps)?.slice(1, 0, nh)?.reshape(&[g.steps, g.n, g.hidden])?;
    let last = states.slice(0, last, 1)?;
    let h_last = last.slice(1, 0, nh)?.reshape(&[g.n, g.hidden])?;
    let c_last = if g.kind == CellKind::Lstm { Some(last.slice(1, nh, nh)?.reshape(&[g.n, g.hidden])?) } else { None };
    Ok(RnnSequence { outputs, h_last, c_last })
}

/// The fused forward: per step, hg = h W_hh^T (matmul) and the cell kernel.
fn fused_states(g: &SeqGeom, xg: &Tensor, w_hh: &Tensor, b_hh: &Tensor, h0: &Tensor, c0: Option<&Tensor>, lengths: Option<&[usize]>) -> Result<Tensor> {
    let dev = xg.device();
    let (nh, gh) = (g.nh(), g.gh());
    let states = dev.alloc(4 * ((g.steps + 1) * g.slot) as u64, "rnn states")?;
    // Zeroed so the padding between slots holds no stale values (an anomaly watch reads the whole tensor).
    dev.zero(&states)?;
    let init = g.ends().0 * g.slot;
    dev.copy(&h0.view(), &states.sub(4 * init as u64, 4 * nh as u64), 4 * nh as u64)?;
    if let Some(c0) = c0 {
        dev.copy(&c0.view(), &states.sub(4 * (init + nh) as u64, 4 * nh as u64), 4 * nh as u64)?;
    }
    let lens = match lengths {
        Some(l) => dev.upload(bytemuck::cast_slice(&l.iter().map(|&v| v as u32).collect::<Vec<u32>>()), "rnn lengths")?,
        None => dev.upload(bytemuck::cast_slice(&[0u32]), "rnn lengths")?,
    };
    let acts = dev.alloc(4 * (g.steps * g.n * g.kind.acts_width(g.hidden)).max(1) as u64, "rnn activations")?;
    let (xv, wv, bv) = (xg.view(), w_hh.view(), b_hh.view());
    for t in g.order() {
        let before = g.slots(t).0;
        let hg = kernels::matmul(&states.sub(4 * (before * g.slot) as u64, 4 * nh as u64), &wv, 1, g.n, gh, g.hidden, 0, 0, false, true)?;
        kernels::rnn_step_forward(g, t, &xv, &hg, &bv, &lens, lengths.is_some(), &states, &acts)?;
    }
    let saved = RnnSaved { geom: g.clone(), xg: xg.clone(), w_hh: w_hh.clone(), b_hh: b_hh.clone(), h0: h0.clone(), c0: c0.cloned(), lengths: lengths.map(|l| l.to_vec()), acts, lens };
    Ok(Tensor::make(states, vec![g.steps + 1, g.slot], DType::F32, Some(Op::RnnSequence(Box::new(saved)))))
}

/// The fused backward: per step (last first), the cell kernel and dh = dgates W_hh; then W_hh's and b_hh's
/// gradients over all steps at once. `gs` is the gradient of the states [T + 1, slot].
pub(crate) fn fused_grads<'a>(s: &'a RnnSaved, states: &Tensor, gs: &Tensor) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let g = &s.geom;
    let dev = states.device();
    let (nh, gh, rows) = (g.nh(), g.gh(), g.steps * g.n);
    let dstride = round_to_binding(g.n * gh, dev);
    let dxg_pad = dev.alloc(4 * (g.steps * dstride).max(1) as u64, "rnn input-projection gradient")?;
    let dhg_pad = dev.alloc(4 * (g.steps * dstride).max(1) as u64, "rnn recurrent-projection gradient")?;
    let carry = dev.alloc(4 * 2 * nh as u64, "rnn carried gradient")?;
    dev.zero(&carry)?;
    let mut dh_rec = dev.alloc(4 * nh as u64, "rnn recurrent gradient")?;
    dev.zero(&dh_rec)?;
    let (sv, gv, wv) = (states.view(), gs.view(), s.w_hh.view());
    for t in g.order().into_iter().rev() {
        kernels::rnn_step_backward(g, t, dstride, &s.acts, &sv, &gv, &dh_rec, &s.lens, s.lengths.is_some(), &dxg_pad, &dhg_pad, &carry)?;
        dh_rec = kernels::matmul(&dhg_pad.sub(4 * (t * dstride) as u64, 4 * (g.n * gh) as u64), &wv, 1, g.n, g.hidden, gh, 0, 0, false, false)?;
    }
    let gather = |src: &BufView, first: usize, stride: usize, width: usize, what: &str| -> Result<BufView> {
        let dst = kernels::out_buffer(src, g.steps * width, what)?;
        kernels::strided_copy(src, first * stride, &[stride, 1], &dst, 0, &[width, 1], &[g.steps, width])?;
        Ok(dst)
    };
    let mut grads = Vec::with_capacity(5);
    let dxg = gather(&dxg_pad, 0, dstride, g.n * gh, "rnn input-projection gradient")?;
    grads.push((&s.xg, Tensor::make(dxg, s.xg.shape().to_vec(), DType::F32, None)));
    if s.w_hh.requires_grad() || s.b_hh.requires_grad() {
        let dhg = gather(&dhg_pad, 0, dstride, g.n * gh, "rnn recurrent-projection gradient")?;
        // The state each step started from, in time order: slots 0..T forward, 1..T+1 reversed.
        let h_prev = gather(&sv, if g.reverse { 1 } else { 0 }, g.slot, nh, "rnn previous states")?;
        let dw = kernels::matmul(&dhg, &h_prev, 1, gh, g.hidden, rows, 0, 0, true, false)?;
        grads.push((&s.w_hh, Tensor::make(dw, s.w_hh.shape().to_vec(), DType::F32, None)));
        let db = kernels::reduce(&dhg, 1, rows, gh, false, 1.0)?;
        grads.push((&s.b_hh, Tensor::make(db, s.b_hh.shape().to_vec(), DType::F32, None)));
    }
    // The initial state: what the first step passed back, plus any gradient of its own slot.
    let part = |src: &BufView, offset: usize, what: &str| -> Result<Tensor> {
        let dst = kernels::out_buffer(src, nh, what)?;
        dev.copy(&src.sub(4 * offset as u64, 4 * nh as u64), &dst, 4 * nh as u64)?;
        Tensor::from_storage(dst, &[g.n, g.hidden], DType::F32)
    };
    let init = g.ends().0 * g.slot;
    let dh0 = part(&carry, 0, "rnn h0 gradient")?.add(&Tensor::from_storage(dh_rec, &[g.n, g.hidden], DType::F32)?)?.add(&part(&gv, init, "rnn h0 gradient")?)?;
    grads.push((&s.h0, dh0));
    if let Some(c0) = &s.c0 {
        grads.push((c0, part(&carry, nh, "rnn c0 gradient")?.add(&part(&gv, init + nh, "rnn c0 gradient")?)?));
    }
    Ok(grads)
}

/// The op's composite formula as recorded ops, for `backward_create_graph`.
pub(crate) fn composite_of(s: &RnnSaved, t: &[Tensor]) -> Result<Tensor> {
    composed_states(&s.geom, &t[0], &t[1], &t[2], &t[3], t.get(4), s.lengths.as_deref())
}

/// The states [T + 1, slot] with ordinary ops: per step, the cell's equations on slices of the gates.
fn composed_states(g: &SeqGeom, xg: &Tensor, w_hh: &Tensor, b_hh: &Tensor, h0: &Tensor, c0: Option<&Tensor>, lengths: Option<&[usize]>) -> Result<Tensor> {
    let (n, nh) = (g.n, g.nh());
    let dev = xg.device();
    // keep[t] [n, 1]: 1 while step t is inside sequence i, 0 after its end.
    let keep = match lengths {
        Some(l) => Some(Tensor::from_slice_on(dev, &(0..g.steps * n).map(|i| (i / n < l[i % n]) as u8 as f32).collect::<Vec<_>>(), &[g.steps * n, 1])?),
        None => None,
    };
    let pad = g.slot - g.kind.states() * nh;
    let slot = |h: &Tensor, c: Option<&Tensor>| -> Result<Tensor> {
        let mut parts = vec![h.reshape(&[1, nh])?];
        if let Some(c) = c {
            parts.push(c.reshape(&[1, nh])?);
        }
        if pad > 0 {
            parts.push(Tensor::full_on(dev, &[1, pad], 0.0)?);
        }
        Tensor::concat(&parts.iter().collect::<Vec<_>>(), 1)
    };
    let mut slots: Vec<Option<Tensor>> = vec![None; g.steps + 1];
    slots[g.ends().0] = Some(slot(h0, c0)?);
    let (mut h, mut c) = (h0.clone(), c0.cloned());
    for t in g.order() {
        let xt = xg.slice(0, t * n, n)?;
        let (mut h2, mut c2) = cell_step(g.kind, &xt, &h, c.as_ref(), w_hh, b_hh, g.hidden)?;
        if let Some(k) = &keep {
            // Inside a sequence the step's state; past its end the state before it.
            let m = k.slice(0, t * n, n)?;
            h2 = h.add(&h2.sub(&h)?.broadcast_mul(&m)?)?;
            c2 = match (c2, &c) {
                (Some(new), Some(old)) => Some(old.add(&new.sub(old)?.broadcast_mul(&m)?)?),
                (c2, _) => c2,
            };
        }
        slots[g.slots(t).1] = Some(slot(&h2, c2.as_ref())?);
        (h, c) = (h2, c2);
    }
    let slots: Vec<Tensor> = slots.into_iter().map(|s| s.expect("every slot is written")).collect();
    Tensor::concat(&slots.iter().collect::<Vec<_>>(), 0)
}

/// One step of a cell in composed ops, from the input's projection `xp` [n, G*H] and the state.
fn cell_step(kind: CellKind, xp: &Tensor, h: &Tensor, c: Option<&Tensor>, w_hh: &Tensor, b_hh: &Tensor, hidden: usize) -> Result<(Tensor, Option<Tensor>)> {
    let hp = h.matmul_t(w_hh, false, true)?.bias_act(b_hh, 1, BiasAct::Identity)?;
    let part = |t: &Tensor, k: usize| t.slice(1, k * hidden, hidden);
    match kind {
        CellKind::Tanh => Ok((xp.add(&hp)?.tanh()?, None)),
        CellKind::Lstm => {
            let gates = xp.add(&hp)?;
            let (i, f, g, o) = (part(&gates, 0)?.sigmoid()?, part(&gates, 1)?.sigmoid()?, part(&gates, 2)?.tanh()?, part(&gates, 3)?.sigmoid()?);
            let c = f.mul(c.expect("an LSTM carries c"))?.add(&i.mul(&g)?)?;
            Ok((o.mul(&c.tanh()?)?, Some(c)))
        }
        CellKind::Gru => {
            let r = part(xp, 0)?.add(&part(&hp, 0)?)?.sigmoid()?;
            let z = part(xp, 1)?.add(&part(&hp, 1)?)?.sigmoid()?;
            let n = part(xp, 2)?.add(&r.mul(&part(&hp, 2)?)?)?.tanh()?;
            // h' = (1 - z) * n + z * h = n + z * (h - n)
            Ok((n.add(&z.mul(&h.sub(&n)?)?)?, None))
        }
    }
}
