//! Recurrent cells: modules whose forward takes state and returns the next (the [`Module`] trait carries no
//! forward signature, so each cell has its own).

use kiln_graph::kernels::BiasAct;
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
