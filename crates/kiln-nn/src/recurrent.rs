//! Recurrent cells and layers: modules whose forward takes state and returns the next (the [`Module`] trait
//! carries no forward signature, so each has its own). `LstmCell` is one step; `Rnn` is PyTorch's `nn.RNN`,
//! `nn.LSTM` and `nn.GRU` (stacked, bidirectional, batch-first, dropout between layers).

use kiln_graph::kernels::BiasAct;
use kiln_graph::rnn::rnn_sequence;
use kiln_graph::{Result, Tensor};

use crate::init::Init;
use crate::module::{shape_error, Module};
use crate::varstore::{Param, VarStore};

/// An LSTM's state between steps: hidden `h` and cell `c`, each [n, hidden].
#[derive(Clone, Debug)]
pub struct LstmState {
    pub h: Tensor,
    pub c: Tensor,
}

/// One LSTM step as PyTorch's `nn.LSTMCell` computes it: gates = x W_ih^T + b_ih + h W_hh^T + b_hh, split
/// into input, forget, cell and output gates (that order); c' = f * c + i * g; h' = o * tanh(c').
/// x [n, in], h and c [n, hidden], w_ih [4 hidden, in], w_hh [4 hidden, hidden], biases [4 hidden].
pub fn lstm_cell(x: &Tensor, state: &LstmState, w_ih: &Tensor, w_hh: &Tensor, b_ih: &Tensor, b_hh: &Tensor) -> Result<LstmState> {
    let hidden = state.h.shape().last().copied().unwrap_or(0);
    let four = [4 * hidden];
    if w_hh.shape() != [4 * hidden, hidden] || w_ih.rank() != 2 || w_ih.shape()[0] != 4 * hidden || b_ih.shape() != four || b_hh.shape() != four {
        return Err(kiln_graph::KilnError::Shape {
            op: "lstm_cell",
            lhs: w_ih.shape().to_vec(),
            rhs: w_hh.shape().to_vec(),
            detail: format!(": for hidden size {hidden}, w_ih is [{}, in], w_hh [{}, {hidden}], the biases [{}]", 4 * hidden, 4 * hidden, 4 * hidden),
        });
    }
    let gates = x.matmul_t(w_ih, false, true)?.add(&state.h.matmul_t(w_hh, false, true)?)?.bias_act(&b_ih.add(b_hh)?, 1, BiasAct::Identity)?;
    let gate = |k: usize| gates.slice(1, k * hidden, hidden);
    let (i, f, g, o) = (gate(0)?.sigmoid()?, gate(1)?.sigmoid()?, gate(2)?.tanh()?, gate(3)?.sigmoid()?);
    let c = f.mul(&state.c)?.add(&i.mul(&g)?)?;
    let h = o.mul(&c.tanh()?)?;
    Ok(LstmState { h, c })
}

/// `nn.LSTMCell`: parameters `{name}.weight_ih` [4H, in], `{name}.weight_hh` [4H, H], `{name}.bias_ih`,
/// `{name}.bias_hh` [4H], initialised as PyTorch does, U(-1/sqrt(H), 1/sqrt(H)).
pub struct LstmCell {
    pub weight_ih: Param,
    pub weight_hh: Param,
    pub bias_ih: Param,
    pub bias_hh: Param,
    pub input_size: usize,
    pub hidden_size: usize,
}

impl LstmCell {
    pub fn new(vs: &mut VarStore, name: &str, input_size: usize, hidden_size: usize) -> Result<LstmCell> {
        let k = 1.0 / (hidden_size as f32).sqrt();
        let init = Init::Uniform { lo: -k, hi: k };
        Ok(LstmCell {
            weight_ih: vs.param(&format!("{name}.weight_ih"), &[4 * hidden_size, input_size], init, true)?,
            weight_hh: vs.param(&format!("{name}.weight_hh"), &[4 * hidden_size, hidden_size], init, true)?,
            bias_ih: vs.param(&format!("{name}.bias_ih"), &[4 * hidden_size], init, false)?,
            bias_hh: vs.param(&format!("{name}.bias_hh"), &[4 * hidden_size], init, false)?,
            input_size,
            hidden_size,
        })
    }

    /// Zeros for a batch of `n` (on the parameters' device).
    pub fn zero_state(&self, n: usize) -> Result<LstmState> {
        let dev = self.weight_ih.tensor()?.device();
        let z = Tensor::full_on(dev, &[n, self.hidden_size], 0.0)?;
        Ok(LstmState { h: z.clone(), c: z })
    }

    /// One step: x [n, input_size] and the state before it -> the state after it (h is the step's output).
    pub fn forward(&self, x: &Tensor, state: &LstmState) -> Result<LstmState> {
        if x.rank() != 2 || x.shape()[1] != self.input_size {
            return Err(shape_error(&self.describe(), x.shape(), "expects x [n, input_size]"));
        }
        let want = [x.shape()[0], self.hidden_size];
        if state.h.shape() != want || state.c.shape() != want {
            return Err(shape_error(&self.describe(), state.h.shape(), &format!("expects h and c [{}, {}], got c {:?}", want[0], want[1], state.c.shape())));
        }
        lstm_cell(x, state, self.weight_ih.tensor()?, self.weight_hh.tensor()?, self.bias_ih.tensor()?, self.bias_hh.tensor()?)
    }
}

impl Module for LstmCell {
    fn describe(&self) -> String {
        format!("LSTMCell({}, {})", self.input_size, self.hidden_size)
    }
    fn own_params(&self) -> Vec<&Param> {
        vec![&self.weight_ih, &self.weight_hh, &self.bias_ih, &self.bias_hh]
    }
}

pub use kiln_graph::rnn::CellKind;

/// One direction of one layer's weights: w_ih [G*H, in], w_hh [G*H, H], b_ih and b_hh [G*H].
#[derive(Clone, Debug)]
pub struct RnnWeights {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    pub b_ih: Tensor,
    pub b_hh: Tensor,
}

/// The state of a stacked RNN: h (and c for an LSTM), each [layers * directions, n, hidden], index
/// layer * directions + direction, as PyTorch orders it.
#[derive(Clone, Debug)]
pub struct RnnState {
    pub h: Tensor,
    pub c: Option<Tensor>,
}

/// A stacked, optionally bidirectional RNN over x [t, n, in] (time first, as PyTorch's default), as a function
/// of its weights: `weights[layer * directions + direction]`. Returns the last layer's outputs [t, n,
/// directions * hidden] and the final state. `between` runs on each layer's output before the next layer
/// (dropout in training).
pub fn rnn_forward(kind: CellKind, x: &Tensor, state: Option<&RnnState>, weights: &[RnnWeights], directions: usize, between: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<(Tensor, RnnState)> {
    rnn_forward_lengths(kind, x, None, state, weights, directions, between)
}

/// [`rnn_forward`] over a padded batch: sequence i has `lengths[i]` valid steps and its padding never changes a
/// result, as with PyTorch's packed sequences. Past its end a sequence's state is held (so its final state is
/// the one at its last step) and its outputs are zero; the reverse direction starts at each sequence's own
/// last step.
pub fn rnn_forward_lengths(
    kind: CellKind,
    x: &Tensor,
    lengths: Option<&[usize]>,
    state: Option<&RnnState>,
    weights: &[RnnWeights],
    directions: usize,
    between: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, RnnState)> {
    if x.rank() != 3 || directions == 0 || weights.is_empty() || !weights.len().is_multiple_of(directions) || weights[0].w_hh.rank() != 2 {
        return Err(shape_error("rnn_forward", x.shape(), &format!("expects x [t, n, in] and weights for each layer and each of {directions} directions (got {})", weights.len())));
    }
    let (steps, n) = (x.shape()[0], x.shape()[1]);
    let hidden = weights[0].w_hh.shape()[1];
    let layers = weights.len() / directions;
    let zeros = || Tensor::full_on(x.device(), &[layers * directions, n, hidden], 0.0);
    let h0 = match state {
        Some(s) => s.h.clone(),
        None => zeros()?,
    };
    let c0 = match (kind, state.and_then(|s| s.c.clone())) {
        (CellKind::Lstm, Some(c)) => Some(c),
        (CellKind::Lstm, None) => Some(zeros()?),
        _ => None,
    };
    // keep [t, n, 1]: 1 while step t is inside sequence i, 0 after its end (outputs there are zero).
    let keep = match lengths {
        Some(l) if l.len() != n || l.iter().any(|&len| len > steps) => {
            return Err(shape_error("rnn_forward", x.shape(), &format!("lengths {l:?}: one per sequence, each at most the {steps} steps")));
        }
        Some(l) => Some(Tensor::from_slice_on(x.device(), &(0..steps * n).map(|i| (i / n < l[i % n]) as u8 as f32).collect::<Vec<_>>(), &[steps, n, 1])?),
        None => None,
    };
    let mut input = x.clone();
    let (mut h_n, mut c_n) = (Vec::new(), Vec::new());
    for layer in 0..layers {
        let mut outputs = Vec::with_capacity(directions);
        for dir in 0..directions {
            let k = layer * directions + dir;
            let w = &weights[k];
            let in_size = input.shape()[2];
            // Every step's input projection in one product: [t * n, in] @ W_ih^T + b_ih.
            let xp = input.reshape(&[steps * n, in_size])?.matmul_t(&w.w_ih, false, true)?.bias_act(&w.b_ih, 1, BiasAct::Identity)?;
            let h = h0.slice(0, k, 1)?.reshape(&[n, hidden])?;
            let c = c0.as_ref().map(|c| c.slice(0, k, 1).and_then(|c| c.reshape(&[n, hidden]))).transpose()?;
            let seq = rnn_sequence(kind, &xp, &w.w_hh, &w.b_hh, &h, c.as_ref(), lengths, dir == 1)?;
            outputs.push(match &keep {
                Some(k) => seq.outputs.broadcast_mul(k)?,
                None => seq.outputs,
            });
            h_n.push(seq.h_last.reshape(&[1, n, hidden])?);
            if let Some(c) = seq.c_last {
                c_n.push(c.reshape(&[1, n, hidden])?);
            }
        }
        input = if directions == 1 { outputs.pop().expect("one direction") } else { Tensor::concat(&outputs.iter().collect::<Vec<_>>(), 2)? };
        if layer + 1 < layers {
            input = between(&input)?;
        }
    }
    let h = Tensor::concat(&h_n.iter().collect::<Vec<_>>(), 0)?;
    let c = if c_n.is_empty() { None } else { Some(Tensor::concat(&c_n.iter().collect::<Vec<_>>(), 0)?) };
    Ok((input, RnnState { h, c }))
}

/// Options of an [`Rnn`] (PyTorch's constructor arguments).
#[derive(Clone, Copy, Debug)]
pub struct RnnConfig {
    pub num_layers: usize,
    pub bidirectional: bool,
    /// x is [n, t, in] and the output [n, t, ...] instead of time first.
    pub batch_first: bool,
    /// Dropout on each layer's output but the last, in training.
    pub dropout: f32,
}

impl Default for RnnConfig {
    fn default() -> Self {
        RnnConfig { num_layers: 1, bidirectional: false, batch_first: false, dropout: 0.0 }
    }
}

/// PyTorch's `nn.RNN` (tanh), `nn.LSTM` and `nn.GRU`: parameters `{name}.weight_ih_l{k}`, `weight_hh_l{k}`,
/// `bias_ih_l{k}`, `bias_hh_l{k}` (`_reverse` for the second direction) with PyTorch's shapes, gate order and
/// initialisation U(-1/sqrt(H), 1/sqrt(H)), so a state_dict moves between the two.
pub struct Rnn {
    pub kind: CellKind,
    pub input_size: usize,
    pub hidden_size: usize,
    pub config: RnnConfig,
    /// Per layer and direction: weight_ih, weight_hh, bias_ih, bias_hh.
    pub params: Vec<[Param; 4]>,
    dropouts: Vec<crate::layers::Dropout>,
}

impl Rnn {
    pub fn new(vs: &mut VarStore, name: &str, kind: CellKind, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Rnn> {
        if config.num_layers == 0 || hidden_size == 0 || input_size == 0 {
            return Err(shape_error(&format!("{kind:?}"), &[input_size, hidden_size, config.num_layers], "input size, hidden size and layers must be at least 1"));
        }
        let (g, k) = (kind.gates() * hidden_size, 1.0 / (hidden_size as f32).sqrt());
        let init = Init::Uniform { lo: -k, hi: k };
        let directions = if config.bidirectional { 2 } else { 1 };
        let mut params = Vec::new();
        for layer in 0..config.num_layers {
            let in_size = if layer == 0 { input_size } else { directions * hidden_size };
            for dir in 0..directions {
                let suffix = format!("l{layer}{}", if dir == 1 { "_reverse" } else { "" });
                params.push([
                    vs.param(&format!("{name}.weight_ih_{suffix}"), &[g, in_size], init, true)?,
                    vs.param(&format!("{name}.weight_hh_{suffix}"), &[g, hidden_size], init, true)?,
                    vs.param(&format!("{name}.bias_ih_{suffix}"), &[g], init, false)?,
                    vs.param(&format!("{name}.bias_hh_{suffix}"), &[g], init, false)?,
                ]);
            }
        }
        let dropouts = (1..config.num_layers).map(|l| crate::layers::Dropout::new(config.dropout, vs_seed(name, l))).collect::<Result<_>>()?;
        Ok(Rnn { kind, input_size, hidden_size, config, params, dropouts })
    }

    pub fn directions(&self) -> usize {
        if self.config.bidirectional {
            2
        } else {
            1
        }
    }

    /// x [t, n, input] ([n, t, input] with `batch_first`) and an optional initial state -> the last layer's
    /// outputs [t, n, directions * hidden] (or batch first) and the final state.
    pub fn forward(&self, x: &Tensor, state: Option<&RnnState>) -> Result<(Tensor, RnnState)> {
        self.forward_lengths(x, None, state)
    }

    /// [`Rnn::forward`] of a padded batch whose sequence i has `lengths[i]` steps (see `rnn_forward_lengths`).
    pub fn forward_lengths(&self, x: &Tensor, lengths: Option<&[usize]>, state: Option<&RnnState>) -> Result<(Tensor, RnnState)> {
        if x.rank() != 3 || x.shape()[2] != self.input_size {
            return Err(shape_error(&self.describe(), x.shape(), "expects x [t, n, input_size] ([n, t, input_size] with batch_first)"));
        }
        let x = if self.config.batch_first { x.transpose(0, 1)? } else { x.clone() };
        let want = [self.config.num_layers * self.directions(), x.shape()[1], self.hidden_size];
        if let Some(s) = state {
            if s.h.shape() != want || s.c.as_ref().is_some_and(|c| c.shape() != want) || (self.kind == CellKind::Lstm) != s.c.is_some() {
                return Err(shape_error(&self.describe(), s.h.shape(), &format!("expects a state h (and c for an LSTM) of {want:?}")));
            }
        }
        let weights = self
            .params
            .iter()
            .map(|[a, b, c, d]| Ok(RnnWeights { w_ih: a.tensor()?.clone(), w_hh: b.tensor()?.clone(), b_ih: c.tensor()?.clone(), b_hh: d.tensor()?.clone() }))
            .collect::<Result<Vec<_>>>()?;
        let layer_index = std::cell::Cell::new(0);
        let between = |t: &Tensor| {
            let i = layer_index.get();
            layer_index.set(i + 1);
            crate::module::Layer::forward(&self.dropouts[i], t)
        };
        let (out, state) = rnn_forward_lengths(self.kind, &x, lengths, state, &weights, self.directions(), &between)?;
        Ok((if self.config.batch_first { out.transpose(0, 1)? } else { out }, state))
    }
}

/// A seed for the dropout between layers `layer - 1` and `layer`, from the layer's name.
fn vs_seed(name: &str, layer: usize) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)) ^ layer as u64
}

impl Module for Rnn {
    fn describe(&self) -> String {
        let kind = match self.kind {
            CellKind::Tanh => "RNN",
            CellKind::Lstm => "LSTM",
            CellKind::Gru => "GRU",
        };
        let c = &self.config;
        format!("{kind}({}, {}, num_layers={}, bidirectional={}, batch_first={}, dropout={})", self.input_size, self.hidden_size, c.num_layers, c.bidirectional, c.batch_first, c.dropout)
    }
    fn own_params(&self) -> Vec<&Param> {
        self.params.iter().flatten().collect()
    }
    fn set_training(&mut self, training: bool) {
        self.dropouts.iter_mut().for_each(|d| d.set_training(training));
    }
    fn set_rng_position(&mut self, steps: u64) {
        self.dropouts.iter_mut().for_each(|d| d.set_rng_position(steps));
    }
}
