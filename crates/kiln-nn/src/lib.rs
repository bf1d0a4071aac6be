//! kiln-nn: parameters in one flat GPU buffer, modules, initialisers, optimizers, LR schedules and metrics.

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod attention;
pub mod checkpoint;
pub mod decode;
pub mod detection_metrics;
pub mod init;
pub mod layers;
pub mod lbfgs;
pub mod metric_learning;
pub mod metrics;
pub mod module;
pub mod optim;
pub mod parallel;
pub mod recurrent;
pub mod schedule;
pub mod varstore;

pub use attention::{
    key_padding_mask, layer_norm, scaled_dot_product_attention, sinusoidal_positions, AdditiveAttention, LayerNorm, MultiheadAttention, MultiplicativeAttention, TransformerDecoderLayer,
    TransformerEncoderLayer,
};
pub use init::Init;
pub use kiln_graph::{fusion_enabled, set_fusion};
pub use layers::{add_channel_bias, AdaptiveAvgPool2d, AvgPool2d, BatchNorm, Conv2d, Conv2dConfig, ConvTranspose2d, Dropout, Embedding, Flatten, GlobalAvgPool, MaxPool2d, Padding, Unflatten};
pub use module::{shape_error, Activation, Layer, Linear, Module, Sequential};
pub use optim::{Clip, GroupOptions, Optimizer, OptimizerKind};
pub use recurrent::{lstm_cell, rnn_forward, rnn_forward_lengths, CellKind, LstmCell, LstmState, Rnn, RnnConfig, RnnState, RnnWeights};
pub use schedule::LrSchedule;
pub use varstore::{Param, VarStore};
