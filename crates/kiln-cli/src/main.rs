//! `kiln`: train, info (and, as the engine grows, eval and bench).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_models::{Progress, TrainConfig, TrainReport};

#[cfg(feature = "mpi")]
mod distributed;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: a deep-learning training engine on any GPU (wgpu: Vulkan, Metal, DX12)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{v} must be a positive number"));
    }
    Ok(v)
}

fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{v} must be zero or positive"));
    }
    Ok(v)
}

/// The models trained by their own step loop (kiln_models::lm, scenes, yolo, segment, rcnn), not the epoch
/// trainer: sequence models on text and scenes, detectors and segmenters on object scenes.
const OWN_LOOP_MODELS: [(&str, &str); 14] = [
    ("char-rnn", "character-level LSTM/GRU language model on Moby-Dick (--cell, --steps; kiln sample)"),
    ("char-transformer", "character-level decoder-only Transformer on Moby-Dick (--steps; kiln sample)"),
    ("names", "character-level GRU that generates first names (--cell, --steps)"),
    ("g2p", "grapheme-to-phoneme encoder-decoder LSTM with attention on CMUdict (--steps, --no-attention)"),
    ("captioning", "CNN encoder and LSTM decoder with attention over its grid, on synthetic scenes (--steps)"),
    ("vqa", "CNN and question LSTM fused, answer classifier, on synthetic scenes (--steps)"),
    ("yolo", "YOLO with k-means anchors and GPU NMS on object scenes (--steps, --image-size, --objects)"),
    ("segment", "FCN, SegNet or U-Net semantic segmentation on object scenes (--decoder, --steps)"),
    ("rcnn", "two-stage detector: RPN, RoI-Align box head and mask head, on object scenes (--steps)"),
    ("localize", "classification with localisation: one object or none, class and box (--loss mixed|squared)"),
    ("autoencoder", "convolutional (--mlp) or denoising (--noise) autoencoder on mnist or fashion-mnist (--steps)"),
    ("vae", "variational autoencoder on binarised MNIST-10k: test ELBO, log p(x), samples (--latent, --steps)"),
    ("dcgan", "DCGAN on fashion-mnist or mnist: a sample grid per epoch, a Frechet distance (--epochs, --loss)"),
    ("siamese", "embedding net, triplet or contrastive loss, verified on unseen Fashion-MNIST classes (--mining)"),
];
const OWN_LOOP_DATASETS: [(&str, &str); 5] = [
    ("moby-dick", "Herman Melville's Moby-Dick, 1.19 M characters, the last 5% held out"),
    ("names", "8,849 English first names (female and male), a seeded 10% held out"),
    ("cmudict", "the CMU Pronouncing Dictionary, 133,784 entries; seeded word-level train/dev/test"),
    ("scenes", "seeded synthetic scenes: 2-4 coloured shapes, captions and questions; 1,000 held out"),
    ("object-scenes", "MNIST-10k digits / Fashion-MNIST pasted on photos, boxes and masks; test glyphs held out"),
];

fn model_list() -> String {
    let models: String = kiln_models::MODELS.iter().chain(&OWN_LOOP_MODELS).map(|(n, d)| format!("  {n:<10} {d}\n")).collect();
    let data: String = kiln_data::DATASETS.iter().chain(&OWN_LOOP_DATASETS).map(|(n, d)| format!("  {n:<14} {d}\n")).collect();
    format!("Models:\n{models}\nData sets (bundled, real):\n{data}")
}

#[derive(clap::Args)]
#[command(after_help = model_list())]
struct TrainArgs {
    /// Model to train (see the list below).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(kiln_models::MODELS.iter().chain(&OWN_LOOP_MODELS).map(|m| m.0)))]
    model: String,
    /// Data set (see the list below).
    #[arg(long, short, default_value = "digits", value_parser = clap::builder::PossibleValuesParser::new(kiln_data::DATASETS.iter().chain(&OWN_LOOP_DATASETS).map(|d| d.0)))]
    dataset: String,
    /// char-rnn, char-transformer, names, g2p, captioning, vqa, yolo, segment, rcnn: training steps
    /// [default: 2000, 3000, 1500, 2500, 1500, 1500, 1500, 1000, 1500].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// char-rnn and names: the recurrent cell, lstm or gru [default: lstm for char-rnn, gru for names].
    #[arg(long, value_parser = ["lstm", "gru"])]
    cell: Option<String>,
    /// g2p: the encoder-decoder without attention (the baseline).
    #[arg(long)]
    no_attention: bool,
    /// g2p: the Transformer encoder-decoder instead of the LSTMs (--hidden D sets d_model, one entry per
    /// encoder and decoder layer).
    #[arg(long, conflicts_with = "no_attention")]
    transformer: bool,
    /// char-rnn: truncated backpropagation through time (the text as batch-size streams, the state carried
    /// from batch to batch; the held-out text read as one stream).
    #[arg(long)]
    tbptt: bool,
    /// Passes over the training split [default: per model].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: Option<u64>,
    /// Samples per step [default: per model; full batch for linreg/logreg].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: Option<u64>,
    /// Learning rate [default: per model].
    #[arg(long, value_parser = positive_f32, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// gd, sgd (momentum 0.9), nesterov, rmsprop, adam, adamw [default: per model].
    #[arg(long)]
    optimizer: Option<String>,
    /// L2 penalty (decoupled weight decay for adamw); biases are not decayed.
    #[arg(long, value_parser = non_negative_f32, allow_negative_numbers = true)]
    weight_decay: Option<f32>,
    /// constant, step:EVERY:GAMMA, exp:GAMMA, cosine[:MIN_FACTOR], each with optional +warmup:STEPS.
    #[arg(long)]
    schedule: Option<String>,
    /// Hidden layer sizes for mlp, e.g. 128 or 256,128.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    hidden: Option<Vec<u64>>,
    /// Polynomial degree for polyreg.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=30))]
    degree: Option<u64>,
    /// Feature column for polyreg.
    #[arg(long)]
    feature: Option<usize>,
    /// Use at most this many training samples.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    train_limit: Option<u64>,
    /// Seed for initialisation, split and batch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Adapter: part of its name or backend, or its index from `kiln info` (also KILN_ADAPTER).
    #[arg(long)]
    adapter: Option<String>,
    /// Directory for metrics.csv [default: runs/<model>-<dataset>/].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Read the data files from this directory instead of the bundled copies (same as KILN_DATA).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start from a checkpoint's parameters (every name and shape that matches): transfer learning.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Freeze parameters by name prefix (repeatable or comma-separated), e.g. --freeze features.
    #[arg(long, value_delimiter = ',')]
    freeze: Vec<String>,
    /// Continue an interrupted run (a crash, Ctrl-C) from its resume.safetensors: the same --out and settings;
    /// it picks up at the batch the run's last checkpoint reached, and ends as the uninterrupted run would.
    #[arg(long)]
    resume: bool,
    /// Seconds between checkpoints in the middle of an epoch (default 300): what a crash can lose.
    #[arg(long, value_name = "SECONDS")]
    checkpoint_every: Option<f64>,
    /// Check every op's output for NaN and infinity and stop at the first, naming the op (slower: a debug mode).
    #[arg(long)]
    anomaly: bool,
    /// Data-parallel training over several devices: adapter indices from `kiln info` or names, comma-separated
    /// (`0,1`; `0,0` opens two devices on adapter 0), or `all`. --batch-size is the whole batch, split between them.
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// Run as one rank of a distributed job: `mpi` under `mpirun -np N kiln train ...` (a Kiln built with
    /// `--features mpi`). Each rank takes its rows of every batch on its own adapter (local rank modulo the
    /// adapters, unless --devices says); rank 0 alone prints and writes the run directory.
    #[arg(long, value_name = "BACKEND")]
    distributed: Option<String>,
    /// With --devices or --distributed: synchronised batch norm (PyTorch's SyncBatchNorm): batch norm uses the
    /// whole batch's statistics, every device's and rank's rows, instead of each device's own shard's.
    #[arg(long)]
    sync_bn: bool,
    /// Stop when the dev metric has not improved for this many epochs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    patience: Option<u64>,
    /// GPU augmentation of training batches: flip, shift[:PX], rotate[:DEG], scale[:FRAC], jitter[:AMOUNT], noise[:STD].
    #[arg(long)]
    augment: Option<String>,
    /// yolo, segment, rcnn, localize: the scenes, `small` (the examples': 64 x 64, 1-3 digits at 0.7-1.4x their
    /// size) or `full` (the data set's defaults: 128 x 128, 2-6 digits and Fashion-MNIST items at 0.5-2x, 20
    /// classes) [default: small]; --image-size and --objects change either.
    #[arg(long, value_parser = ["small", "full"])]
    scenes: Option<String>,
    /// yolo, segment, rcnn, localize: the scenes' side in pixels [default: 64, or 128 with --scenes full].
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..=1024))]
    image_size: Option<u64>,
    /// yolo, segment, rcnn, localize: the objects pasted: digits (10 classes), fashion (10) or both (20)
    /// [default: digits, or both with --scenes full].
    #[arg(long, value_parser = ["digits", "fashion", "both"])]
    objects: Option<String>,
    /// yolo, segment, rcnn: write four held-out scenes with the model's predictions to the run directory every
    /// this many steps (scenes-step-NNNNNN.png); 0 for none [default: a fifth of the steps].
    #[arg(long, value_name = "STEPS")]
    sample_every: Option<u64>,
    /// segment: the decoder, fcn, segnet or unet [default: unet].
    #[arg(long, value_parser = ["fcn", "segnet", "unet"])]
    decoder: Option<String>,
    /// yolo: the head's layout, anchors (YOLOv2's, from k-means) or v1 (YOLOv1's S x S x (B * 5 + C), 2 boxes a
    /// cell) [default: anchors].
    #[arg(long, value_parser = ["anchors", "v1"])]
    layout: Option<String>,
    /// segment, yolo: plain convolutions, without the batch norm that follows each 3x3 convolution by default
    /// (YOLOv2's backbone, and the segmenters').
    #[arg(long)]
    no_batch_norm: bool,
    /// segment: an unweighted loss, without the default median frequency balancing of the classes.
    #[arg(long)]
    no_class_weights: bool,
    /// siamese: the loss, triplet (with --mining) or contrastive [default: triplet]; localize: mixed or squared
    /// (the course's sum of squares) [default: mixed]; dcgan: nonsaturating, minimax or wgan-gp
    /// [default: nonsaturating].
    #[arg(long, value_parser = ["triplet", "contrastive", "mixed", "squared", "nonsaturating", "minimax", "wgan-gp"])]
    loss: Option<String>,
    /// vae: the latent size [default: 20].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    latent: Option<u64>,
    /// autoencoder: the inputs' noise for a denoising autoencoder, in [0, 1] [default: 0].
    #[arg(long)]
    noise: Option<f32>,
    /// autoencoder: the MLP instead of the convolutional one.
    #[arg(long)]
    mlp: bool,
    /// siamese: triplet mining in each batch, all, hard or semi-hard [default: all].
    #[arg(long, value_parser = ["semi-hard", "hard", "all"])]
    mining: Option<String>,
    /// siamese: the margin [default: 0.2 for triplet, 1.0 for contrastive].
    #[arg(long, value_parser = positive_f32)]
    margin: Option<f32>,
    /// siamese: what the unseen classes are scored on, the trained embedding or the convolutional features
    /// before its projection [default: embedding].
    #[arg(long, value_parser = ["embedding", "features"])]
    score_on: Option<String>,
    /// siamese: the embedding net's three stages' channels [default: 32,64,64].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=1024))]
    channels: Option<Vec<u64>>,
    /// siamese: the embedding net's trunk, `small` (one convolution a stage) or `deep-bn` (two a stage, each
    /// with batch norm) [default: deep-bn].
    #[arg(long, value_parser = ["small", "deep-bn"])]
    trunk: Option<String>,
    /// siamese with a batch-norm trunk: score with the seen classes' running statistics instead of batch
    /// norm's statistics recomputed on the unseen classes' dev-half images (AdaBN, the default; their labels
    /// unused).
    #[arg(long)]
    no_adapt_bn: bool,
    /// ResNet depth (6n+2: 20, 32, 56).
    #[arg(long, value_parser = clap::value_parser!(u64).range(8..=200))]
    depth: Option<u64>,
}

#[derive(clap::Args)]
struct StyleArgs {
    /// The content picture.
    #[arg(long, default_value = "astronaut.png")]
    content: PathBuf,
    /// The style picture.
    #[arg(long, default_value = "starry_night.jpg")]
    style: PathBuf,
    /// Where to write the result (PNG).
    #[arg(long, default_value = "style.png")]
    out: PathBuf,
    /// The longer side of the result in pixels (the content is resized to it, the style to the same size).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(32..=2048))]
    size: u64,
    /// Steps on the pixels (each one forward and backward of the feature network).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// adam, or lbfgs (the paper's optimiser; PyTorch's L-BFGS rules, history 100).
    #[arg(long, default_value = "adam", value_parser = ["adam", "lbfgs"])]
    optimizer: String,
    /// A torchvision VGG-16/19 converted to safetensors (features.N.weight names); without it, VGG-19's layout
    /// with random weights (random-feature style transfer).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// With random weights: VGG-19's channels divided by this.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    divisor: u64,
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f32)]
    content_weight: f32,
    #[arg(long, default_value_t = 1e7, value_parser = non_negative_f32)]
    style_weight: f32,
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f32)]
    tv_weight: f32,
    /// Learning rate (Adam) or step size (L-BFGS) [default: 0.03 for adam, 1 for lbfgs].
    #[arg(long, value_parser = positive_f32)]
    lr: Option<f32>,
    /// Start from uniform noise instead of the content picture.
    #[arg(long)]
    from_noise: bool,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    adapter: Option<String>,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Train a model on a real data set and report test metrics.
    Train(TrainArgs),
    /// Neural style transfer: an image with the content of one picture and the style of another (PNG or JPEG;
    /// astronaut.png and starry_night.jpg are shipped and found by name).
    Style(StyleArgs),
    /// Objects in a picture of your own (PNG or JPEG) with a checkpoint from `kiln train yolo` or `kiln train rcnn`
    /// (its masks too): a PNG with the boxes drawn, and the detections listed (JSON with --json).
    Detect {
        #[arg(long)]
        checkpoint: PathBuf,
        /// The picture (resized to the size the model was trained at; boxes are reported in its own pixels).
        image: PathBuf,
        /// Where the PNG goes [default: the picture's name with .detections.png].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Detections scoring at most this are dropped (the course's p_c threshold).
        #[arg(long, default_value_t = 0.6)]
        min_score: f32,
        /// Non-max suppression (YOLO): a box overlapping a better one of its class by at least this IoU is dropped;
        /// the two-stage detector uses the NMS it was trained with.
        #[arg(long, default_value_t = 0.5)]
        iou: f32,
        #[arg(long)]
        json: bool,
    },
    /// Per-pixel classes of a picture of your own with a checkpoint from `kiln train segment`: a PNG with each
    /// class's pixels tinted, and the share of the picture each class covers (JSON with --json).
    Segment {
        #[arg(long)]
        checkpoint: PathBuf,
        /// The picture (resized to the size the net was trained at).
        image: PathBuf,
        /// Where the PNG goes [default: the picture's name with .segments.png].
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a checkpoint written by `kiln train` on a data set's test split.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Data set [default: the one it was trained on].
        #[arg(long, short, value_parser = kiln_data::DATASETS.map(|d| d.0))]
        dataset: Option<String>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        adapter: Option<String>,
        /// Print the report as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Write every test sample's logits, probabilities, predicted and true label (or target and
        /// prediction) to this CSV file.
        #[arg(long, value_name = "FILE")]
        predictions: Option<PathBuf>,
    },
    /// The kernel benchmark: the adapter's compute and memory roofs, then matmul, conv, pool, softmax,
    /// elementwise and reduction kernels (every variant validated against a CPU reference, then timed) and whole
    /// training steps, each beside a multi-threaded CPU reference on the same machine.
    Bench {
        /// Families to run: matmul, conv, pool, softmax, elementwise, reduce, embedding, recurrent, attention, step,
        /// lm (language-model training steps, tokens/s), detection (NMS, RoI-Align), generative (transposed conv, DCGAN,
        /// VAE, style), allreduce (data-parallel all-reduce and steps) [default: all].
        #[arg(long, value_delimiter = ',', value_parser = kiln_benches::suite::FAMILIES)]
        filter: Vec<String>,
        /// Models whose training-step matmul shapes and whole steps are timed [default: mlp,lenet; --full adds
        /// resnet20].
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Square matmul sizes [default: 256,512; --full: 256,512,1024,2048].
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
        /// Timed runs per record, after one warm-up (median reported; at least 10).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(10..))]
        runs: u64,
        /// Seconds one record may take: a kernel whose single run is slower is reported as not timed
        /// [default: 3; --full: 20].
        #[arg(long)]
        budget_s: Option<f64>,
        /// The whole suite: every size and model, longer records (tens of minutes on a CPU adapter; the
        /// default takes about a minute there).
        #[arg(long)]
        full: bool,
        #[arg(long)]
        adapter: Option<String>,
        /// Also write the records as one JSON array to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// `mpi`: one rank of `mpirun -np N kiln bench --filter allreduce --distributed mpi`, timing the all-reduce
        /// between the ranks (a kiln built with `--features mpi`); rank 0 prints.
        #[arg(long, value_name = "BACKEND")]
        distributed: Option<String>,
    },
    /// Text from a char-rnn checkpoint: the prefix, then `--length` characters drawn at `--temperature`; from
    /// a names checkpoint, `--count` names.
    Sample {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value = "Call me")]
        prefix: String,
        #[arg(long, default_value_t = 200)]
        length: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// names: how many names.
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
    /// Print a model's layers with output shapes and parameter counts (no GPU needed).
    Summary {
        /// lenet, alexnet, vgg16, vgg16_bn, resnet18/34/50, resnet20/32/56 (CIFAR), googlenet
        model: String,
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        classes: u64,
        /// Input as CxHxW [default: per model, 3x224x224 for the ImageNet ones].
        #[arg(long)]
        input: Option<String>,
        /// Print the summary as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Also list every tensor of the model (parameters and buffers) with its name and shape, as
        /// PyTorch's state_dict names them.
        #[arg(long)]
        params: bool,
        /// Write the model, initialised with --seed and untrained, to this safetensors file (uses the GPU).
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List adapters with their features and limits, and the one Kiln picks.
    Info {
        #[arg(long)]
        adapter: Option<String>,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Train(args) => train(args),
        Command::Sample { checkpoint, prefix, length, temperature, top_k, seed, count } => sample(&checkpoint, &prefix, length, temperature, top_k, seed, count),
        Command::Info { adapter } => info(adapter),
        Command::Bench { filter, models, sizes, batch, runs, budget_s, full, adapter, json, distributed } => {
            let base = if full { kiln_benches::suite::SuiteOptions::default() } else { kiln_benches::suite::SuiteOptions::quick() };
            let opts = kiln_benches::suite::SuiteOptions {
                filter,
                runs: runs as usize,
                budget_s: budget_s.unwrap_or(base.budget_s),
                square: if sizes.is_empty() { base.square } else { sizes.iter().map(|&s| s as usize).collect() },
                models: if models.is_empty() { base.models } else { models },
                batch: batch as usize,
                ..base
            };
            match distributed.as_deref() {
                None => bench(&opts, adapter, json),
                Some("mpi") if opts.filter == ["allreduce"] => bench_mpi(opts, adapter, json),
                Some("mpi") => bail!("--distributed mpi times the all-reduce between ranks: give --filter allreduce"),
                Some(other) => bail!("--distributed {other:?}: the backend is mpi (under mpirun)"),
            }
        }
        Command::Summary { model, classes, input, json, params, save, seed } => {
            summary(&model, classes as usize, input.as_deref(), json, params)?;
            match save {
                Some(path) => save_untrained(&model, classes as usize, input.as_deref(), seed, &path),
                None => Ok(()),
            }
        }
        Command::Eval { checkpoint, dataset, data_dir, adapter, json, predictions } => eval(checkpoint, dataset, data_dir, adapter, json, predictions),
        Command::Style(args) => style(&args),
        Command::Detect { checkpoint, image, out, min_score, iou, json } => detect(&checkpoint, &image, out, min_score, iou, json),
        Command::Segment { checkpoint, image, out, json } => segment(&checkpoint, &image, out, json),
    }
}

/// The recurrent sizes a text model's flags ask for: (cell, hidden, layers), `--hidden 128,128` meaning two layers.
fn recurrent_shape(a: &TrainArgs, default_cell: kiln_nn::CellKind, default_hidden: usize) -> (kiln_nn::CellKind, usize, usize) {
    let hidden = a.hidden.as_ref().and_then(|h| h.first().map(|&v| v as usize)).unwrap_or(default_hidden);
    let layers = a.hidden.as_ref().map(|h| h.len()).unwrap_or(1);
    let cell = match a.cell.as_deref() {
        Some("gru") => kiln_nn::CellKind::Gru,
        Some("lstm") => kiln_nn::CellKind::Lstm,
        _ => default_cell,
    };
    (cell, hidden, layers)
}

/// A bar over a run's steps, its message set by the caller.
fn steps_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps  {msg}").expect("static template").progress_chars("=> "));
    bar
}

/// `kiln train char-rnn --dataset moby-dick`: the language model's own loop (kiln_models::lm).
fn train_language_model(a: &TrainArgs) -> Result<()> {
    use kiln_models::lm::LmShape;
    match (a.model.as_str(), a.dataset.as_str()) {
        ("char-rnn" | "char-transformer", "moby-dick") => {}
        ("names", "names") => return train_names(a),
        ("g2p", "cmudict") => return train_g2p(a),
        ("captioning" | "vqa", "scenes") => return train_scene_model(a),
        ("yolo" | "segment" | "rcnn" | "localize", "object-scenes") => return train_object_model(a),
        ("siamese", "fashion-mnist") => return train_siamese_model(a),
        ("autoencoder" | "dcgan", "mnist" | "fashion-mnist") | ("vae", "mnist") => return train_generative_model(a),
        (model, data) => bail!(
            "char-rnn and char-transformer train on moby-dick, names on names, g2p on cmudict, captioning and vqa on scenes, yolo, segment, rcnn and localize on object-scenes, siamese on fashion-mnist, autoencoder and dcgan on mnist or fashion-mnist, vae on mnist (got {model} on {data})"
        ),
    }
    let d = if a.model == "char-transformer" { kiln_models::lm::char_transformer_defaults() } else { kiln_models::lm::CharLmConfig::default() };
    let shape = match d.shape {
        LmShape::Recurrent(r) => {
            let (cell, hidden, layers) = recurrent_shape(a, r.cell, r.hidden);
            LmShape::Recurrent(kiln_models::lm::CharLmShape { cell, hidden, layers, ..r })
        }
        LmShape::Transformer(t) => {
            if a.cell.is_some() || a.tbptt {
                bail!("--cell and --tbptt are for the recurrent models; char-transformer has no cell and no state");
            }
            // --hidden 128,128: d_model 128, two blocks.
            let d_model = a.hidden.as_ref().and_then(|h| h.first().map(|&v| v as usize)).unwrap_or(t.d_model);
            let layers = a.hidden.as_ref().map(|h| h.len()).unwrap_or(t.layers);
            if !d_model.is_multiple_of(t.heads) {
                bail!("--hidden {d_model}: char-transformer's d_model must be a multiple of its {} heads", t.heads);
            }
            LmShape::Transformer(kiln_models::transformer::TransformerLmShape { d_model, layers, feedforward: 4 * d_model, ..t })
        }
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-moby-dick", a.model)));
    let cfg = kiln_models::lm::CharLmConfig {
        shape,
        steps: a.steps.unwrap_or(d.steps),
        batch_size: a.batch_size.map(|b| b as usize).unwrap_or(d.batch_size),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        out_dir: Some(out.clone()),
        data_dir: a.data_dir.clone(),
        tbptt: a.tbptt,
        ..d
    };
    eprintln!("kiln: training {} ({:?}) on moby-dick with {}", a.model, cfg.shape, kiln_wgpu::gpu()?.adapter_name());
    let bar = steps_bar(cfg.steps);
    let r = kiln_models::lm::train_char_lm(&cfg, |p: &Progress| {
        bar.set_position(p.step);
        bar.set_message(format!("loss {:.3}  {:.0} windows/s", p.loss, p.samples_per_s));
    })
    .with_context(|| format!("training {} on moby-dick", a.model))?;
    bar.finish();
    println!("held-out loss {:.3} nats/char ({:.3} bits/char) over {} characters, read as {}", r.held_out_nats_per_char, r.held_out_bits_per_char, r.held_out_chars, r.evaluation);
    println!("baselines: unigram {:.3}, add-k 5-gram {:.3} nats/char", r.unigram_nats_per_char, r.five_gram_nats_per_char);
    println!("{} steps, {:.1} ms/step, {:.0} tokens/s, {} parameters; saved in {}", r.steps, r.ms_per_step, r.tokens_per_s, r.parameters, out.display());
    println!("sample: Call me{}", r.sample);
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `kiln train names --dataset names`: the name generator (kiln_models::names).
fn train_names(a: &TrainArgs) -> Result<()> {
    let d = kiln_models::names::NamesConfig::default();
    let (cell, hidden, layers) = recurrent_shape(a, d.shape.cell, d.shape.hidden);
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs/names"));
    let cfg = kiln_models::names::NamesConfig {
        shape: kiln_models::lm::CharLmShape { cell, hidden, layers, ..d.shape },
        steps: a.steps.unwrap_or(d.steps),
        batch_size: a.batch_size.map(|b| b as usize).unwrap_or(d.batch_size),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        out_dir: Some(out.clone()),
        data_dir: a.data_dir.clone(),
        ..d
    };
    eprintln!("kiln: training names ({:?}, hidden {hidden} x {layers}) with {}", cell, kiln_wgpu::gpu()?.adapter_name());
    let bar = steps_bar(cfg.steps);
    let r = kiln_models::names::train_names(&cfg, |p: &Progress| {
        bar.set_position(p.step);
        bar.set_message(format!("loss {:.3}  {:.0} names/s", p.loss, p.samples_per_s));
    })
    .context("training names")?;
    bar.finish();
    println!("held-out names: {:.3} nats/char ({:.3} bits/char) over {} names; add-k trigram {:.3}", r.held_out_nats_per_char, r.held_out_bits_per_char, r.held_out_names, r.trigram_nats_per_char);
    println!("{} samples: {:.1}% new (not training names), {:.1}% held-out names, {:.1}% distinct", r.samples, 100.0 * r.new_share, 100.0 * r.held_out_share, 100.0 * r.distinct_share);
    println!("{} steps, {:.1} ms/step, {} parameters; saved in {}", r.steps, r.ms_per_step, r.parameters, out.display());
    println!("samples: {}", r.examples.join(", "));
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `kiln train g2p --dataset cmudict`: grapheme-to-phoneme (kiln_models::g2p), attention maps as PNGs.
fn train_g2p(a: &TrainArgs) -> Result<()> {
    let d = if a.transformer { kiln_models::g2p::G2pConfig::transformer() } else { kiln_models::g2p::G2pConfig::default() };
    let hidden = a.hidden.as_ref().and_then(|h| h.first().map(|&v| v as usize));
    let transformer = a.transformer.then(|| {
        let t = kiln_models::g2p::G2P_TRANSFORMER;
        let d_model = hidden.unwrap_or(t.d_model);
        kiln_models::g2p::G2pTransformerShape { d_model, layers: a.hidden.as_ref().map(|h| h.len()).unwrap_or(t.layers), feedforward: 4 * d_model, ..t }
    });
    if let Some(t) = transformer {
        if !t.d_model.is_multiple_of(t.heads) {
            bail!("--hidden {} must be a multiple of the Transformer's {} heads", t.d_model, t.heads);
        }
    }
    let cfg = kiln_models::g2p::G2pConfig {
        shape: kiln_models::g2p::G2pShape { hidden: hidden.unwrap_or(d.shape.hidden), attention: !a.no_attention, transformer, ..d.shape },
        steps: a.steps.unwrap_or(d.steps),
        batch_size: a.batch_size.map(|b| b as usize).unwrap_or(d.batch_size),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        data_dir: a.data_dir.clone(),
        ..d
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(if a.transformer {
            "runs/g2p-transformer"
        } else if a.no_attention {
            "runs/g2p-no-attention"
        } else {
            "runs/g2p"
        })
    });
    eprintln!("kiln: training g2p ({:?}) on cmudict with {}", cfg.shape, kiln_wgpu::gpu()?.adapter_name());
    let bar = steps_bar(cfg.steps);
    let (model, r, words) = kiln_models::g2p::train_g2p(&cfg, |p: &Progress| {
        bar.set_position(p.step);
        bar.set_message(format!("loss {:.3}  {:.0} pairs/s", p.loss, p.samples_per_s));
    })
    .context("training g2p")?;
    bar.finish();
    println!("{} test words, greedy: WER {:.1}%, PER {:.1}%", r.test_words, 100.0 * r.greedy_wer, 100.0 * r.greedy_per);
    println!(
        "first {} of them, beam {}: WER {:.1}%, PER {:.1}% (greedy on the same words: WER {:.1}%)",
        r.beam_words,
        r.beam_width,
        100.0 * r.beam_wer,
        100.0 * r.beam_per,
        100.0 * r.greedy_wer_on_beam_words
    );
    println!("{} steps, {:.1} ms/step, {} parameters, {} training words", r.steps, r.ms_per_step, r.parameters, r.train_words);
    for (w, p) in &r.examples {
        println!("  {w:<16} {p}");
    }
    let outputs: Vec<Vec<u32>> = words.iter().take(4).map(|w| model.greedy(&[w], 30).map(|mut o| o.remove(0))).collect::<Result<_, _>>()?;
    for line in kiln_models::g2p::attention_maps(model.as_ref(), &words, &outputs, 4, &out)? {
        println!("attention map {line}");
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `kiln train captioning|vqa --dataset scenes` (kiln_models::scenes): scores on held-out scenes; captioning
/// also writes PNGs of scenes with the attention of each generated word.
fn train_scene_model(a: &TrainArgs) -> Result<()> {
    use kiln_models::scenes;
    let d = scenes::SceneConfig::default();
    let cfg = scenes::SceneConfig {
        hidden: a.hidden.as_ref().and_then(|h| h.first().map(|&v| v as usize)).unwrap_or(d.hidden),
        steps: a.steps.unwrap_or(d.steps),
        batch_size: a.batch_size.map(|b| b as usize).unwrap_or(d.batch_size),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        ..d
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}", a.model)));
    eprintln!("kiln: training {} on synthetic scenes with {}", a.model, kiln_wgpu::gpu()?.adapter_name());
    let bar = steps_bar(cfg.steps);
    let on_step = |p: &Progress| {
        bar.set_position(p.step);
        bar.set_message(format!("loss {:.3}  {:.0} scenes/s", p.loss, p.samples_per_s));
    };
    if a.model == "captioning" {
        let (model, r) = scenes::train_captioning(&cfg, on_step).context("training captioning")?;
        bar.finish();
        println!("{} held-out scenes: BLEU-4 {:.4}, exact match {:.1}%", r.test_scenes, r.bleu4, 100.0 * r.exact_match);
        println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
        for (truth, said) in &r.examples {
            println!("  {:<5} {said}", if truth == said { "right" } else { "WRONG" });
        }
        for line in scenes::caption_pictures(&model, &scenes::scene_sets(&cfg).1, 4, &out)? {
            println!("picture {line}");
        }
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        }
    } else {
        let (_, r) = scenes::train_vqa(&cfg, on_step).context("training vqa")?;
        bar.finish();
        println!("{} held-out questions: accuracy {:.1}%", r.test_scenes, 100.0 * r.accuracy);
        for (kind, n, acc) in &r.per_kind {
            println!("  {kind:<8} {n:>5} questions  {:.1}%", 100.0 * acc);
        }
        println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
        for (q, truth, given) in &r.examples {
            println!("  {q:<46} {truth:<8} {given}");
        }
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

/// `kiln train yolo|segment|rcnn --dataset object-scenes`: the detectors and segmenters of kiln_models on
/// seeded object scenes (the settings of examples/yolo, segment and rcnn unless flags say otherwise), scored on
/// held-out scenes, with a PNG of four of them: truth, then prediction.
fn train_object_model(a: &TrainArgs) -> Result<()> {
    use kiln_data::{ObjectSceneConfig, ObjectSource};
    let full = a.scenes.as_deref() == Some("full");
    let size = a.image_size.unwrap_or(if full { 128 } else { 64 }) as usize;
    let source = match a.objects.as_deref() {
        Some("fashion") => ObjectSource::Fashion,
        Some("both") => ObjectSource::Both,
        Some(_) => ObjectSource::Digits,
        None if full => ObjectSource::Both,
        None => ObjectSource::Digits,
    };
    let scenes = match a.model.as_str() {
        "localize" => ObjectSceneConfig { size, objects: (0, 1), scale: (0.75, (size as f32 / 28.0).min(2.0)), source, ..Default::default() },
        _ if full => ObjectSceneConfig { size, source, ..Default::default() },
        _ => ObjectSceneConfig { size, objects: (1, 3), scale: (0.7, 1.4), source, ..Default::default() },
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-object-scenes", a.model)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let picture = out.join("scenes.png");
    let what = match source {
        ObjectSource::Digits => "digits",
        ObjectSource::Fashion => "Fashion-MNIST items",
        ObjectSource::Both => "digits and Fashion-MNIST items",
    };
    eprintln!(
        "kiln: training {} on {size} x {size} object scenes of {}-{} {what} at {}-{}x ({} classes) with {}",
        a.model,
        scenes.objects.0,
        scenes.objects.1,
        scenes.scale.0,
        scenes.scale.1,
        source.class_names().len(),
        kiln_wgpu::gpu()?.adapter_name()
    );
    let defaults: u64 = match a.model.as_str() {
        "segment" => 1000,
        _ => 1500,
    };
    let steps = a.steps.unwrap_or(defaults);
    let sample_every = a.sample_every.unwrap_or((steps / 5).max(1));
    let bar = steps_bar(steps);
    let started = std::time::Instant::now();
    let on_step = |step: u64, loss: f32| {
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.3}  {:.1} steps/s", step as f64 / started.elapsed().as_secs_f64().max(1e-9)));
    };
    let data_dir = a.data_dir.clone();
    let json = match a.model.as_str() {
        "yolo" => {
            use kiln_models::yolo::{train_yolo, yolo_pictures, YoloConfig};
            let cfg = YoloConfig {
                scenes,
                anchors: 3,
                v1_boxes: (a.layout.as_deref() == Some("v1")).then_some(2),
                width: 16,
                batch_norm: !a.no_batch_norm,
                steps,
                lr: a.lr.unwrap_or(2e-3),
                batch_size: a.batch_size.unwrap_or(16) as usize,
                seed: a.seed,
                data_dir,
                out_dir: Some(out.clone()),
                sample_every,
                ..Default::default()
            };
            let (model, r) = train_yolo(&cfg, on_step).context("training yolo")?;
            bar.finish();
            println!("checkpoint {} (kiln detect --checkpoint ... PICTURE)", out.join("yolo.safetensors").display());
            println!("{} held-out scenes: mAP@0.5 {:.3}, COCO mAP@[.5:.95] {:.3}", cfg.test_scenes, r.map50, r.coco_map);
            println!("{} steps, {:.1} ms/step, {} parameters; {}{}", r.steps, r.ms_per_step, r.parameters, r.layout, if r.anchors.is_empty() { String::new() } else { format!(" {:?}", r.anchors) });
            yolo_pictures(&model, &cfg, 4, &picture)?;
            serde_json::to_string(&r)?
        }
        "segment" => {
            use kiln_models::segment::{segment_pictures, train_segmentation, Decoder, SegmentConfig};
            let decoder = match a.decoder.as_deref() {
                Some("fcn") => Decoder::Fcn,
                Some("segnet") => Decoder::SegNet,
                _ => Decoder::UNet,
            };
            let cfg = SegmentConfig {
                decoder,
                scenes,
                steps,
                lr: a.lr.unwrap_or(2e-3),
                batch_size: a.batch_size.unwrap_or(8) as usize,
                batch_norm: !a.no_batch_norm,
                median_frequency: !a.no_class_weights,
                seed: a.seed,
                data_dir,
                out_dir: Some(out.clone()),
                sample_every,
                ..Default::default()
            };
            let (net, r) = train_segmentation(&cfg, on_step).context("training segmentation")?;
            bar.finish();
            println!("checkpoint {} (kiln segment --checkpoint ... PICTURE)", out.join("segment.safetensors").display());
            println!("{} held-out scenes ({}): pixel accuracy {:.3}, mIoU {:.3}", cfg.test_scenes, decoder.name(), r.pixel_accuracy, r.miou);
            println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
            segment_pictures(&net, &cfg, 4, &picture)?;
            serde_json::to_string(&r)?
        }
        "localize" => {
            use kiln_models::localize::{localize_pictures, train_localizer, LocalizeConfig};
            let loss = a.loss.as_deref().unwrap_or("mixed").parse().map_err(anyhow::Error::msg)?;
            let cfg = LocalizeConfig { scenes, steps, loss, lr: a.lr.unwrap_or(1e-3), batch_size: a.batch_size.unwrap_or(32) as usize, seed: a.seed, data_dir, ..Default::default() };
            let (model, r) = train_localizer(&cfg, on_step).context("training the localiser")?;
            bar.finish();
            println!(
                "{} held-out scenes ({:?} loss): presence {:.3}; on those with an object: class {:.3}, mean IoU {:.3}, class right and IoU >= 0.5 {:.3}",
                r.test_scenes, r.loss, r.presence_accuracy, r.class_accuracy, r.mean_iou, r.correct_localization
            );
            println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
            localize_pictures(&model, &cfg, 4, &picture)?;
            serde_json::to_string(&r)?
        }
        _ => {
            use kiln_models::rcnn::{train_two_stage, two_stage_pictures, TwoStageConfig, TwoStageRun};
            // The small scenes' objects are 20-39 pixels (their tight boxes smaller); the full scenes' 14-56.
            let anchor_sizes = if full { vec![12.0, 24.0, 48.0] } else { vec![12.0, 20.0, 32.0] };
            let model = TwoStageConfig { anchor_sizes: anchor_sizes.into_iter().map(|a| a * size as f32 / if full { 128.0 } else { 64.0 }).collect(), representation: 128, ..Default::default() };
            let run = TwoStageRun {
                model,
                scenes,
                steps,
                lr: a.lr.unwrap_or(1e-3),
                batch_size: a.batch_size.unwrap_or(8) as usize,
                seed: a.seed,
                data_dir,
                out_dir: Some(out.clone()),
                sample_every,
                ..Default::default()
            };
            let (model, r) = train_two_stage(&run, on_step).context("training the two-stage detector")?;
            bar.finish();
            println!("checkpoint {} (kiln detect --checkpoint ... PICTURE)", out.join("rcnn.safetensors").display());
            println!("{} held-out scenes: box mAP@0.5 {:.3}, COCO box mAP {:.3}; mask AP@0.5 {:.3}, COCO mask mAP {:.3}", run.test_scenes, r.box_map50, r.box_coco_map, r.mask_map50, r.mask_coco_map);
            println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
            two_stage_pictures(&model, &run, 4, &picture)?;
            serde_json::to_string(&r)?
        }
    };
    println!("picture {}", picture.display());
    if a.json {
        println!("{json}");
    }
    Ok(())
}

/// `kiln train siamese --dataset fashion-mnist` (kiln_models::siamese): an embedding net trained on seven
/// classes, verification and one-shot scores on the other three beside the untrained net, and a PNG of the
/// unseen classes' embeddings (PCA).
/// `kiln train autoencoder|vae|dcgan`: the generative models' own loops (kiln_models::autoencoder, vae, gan),
/// pictures in the run directory.
fn train_generative_model(a: &TrainArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", a.model, a.dataset)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("kiln: training {} on {} with {}", a.model, a.dataset, kiln_wgpu::gpu()?.adapter_name());
    let started = std::time::Instant::now();
    let json = match a.model.as_str() {
        "autoencoder" => {
            use kiln_models::autoencoder::{train_autoencoder, AeConfig, AeKind};
            let d = AeConfig::default();
            let noise = a.noise.unwrap_or(0.0);
            let kind = if a.mlp { AeKind::Mlp } else { AeKind::Conv };
            let cfg = AeConfig { dataset: a.dataset.clone(), kind, noise, steps: a.steps.unwrap_or(d.steps), lr: a.lr.unwrap_or(d.lr), seed: a.seed, data_dir: a.data_dir.clone(), ..d };
            let bar = steps_bar(cfg.steps);
            let (_, r, [input, output, clean]) = train_autoencoder(&cfg, |step, loss| {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}  {:.1} steps/s", step as f64 / started.elapsed().as_secs_f64().max(1e-9)));
            })?;
            bar.finish();
            println!("{kind:?} autoencoder (noise {noise}): test BCE {:.4}, MSE {:.4} (the inputs' own MSE {:.4})", r.test_bce, r.test_mse, r.input_mse);
            println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
            // Rows of 8: the inputs, the reconstructions, and for a denoiser the clean images.
            let mut grid = input;
            grid.extend(&output);
            if noise > 0.0 {
                grid.extend(&clean);
            }
            let path = out.join("reconstructions.png");
            kiln_models::plot::image_grid_png(&path, &grid, 28, 8, 2)?;
            println!("picture {}", path.display());
            serde_json::to_string(&r)?
        }
        "vae" => {
            use kiln_models::vae::{train_vae, vae_data, vae_pictures, VaeConfig};
            let d = VaeConfig::default();
            let cfg =
                VaeConfig { steps: a.steps.unwrap_or(d.steps), latent: a.latent.map(|l| l as usize).unwrap_or(d.latent), lr: a.lr.unwrap_or(d.lr), seed: a.seed, data_dir: a.data_dir.clone(), ..d };
            let bar = steps_bar(cfg.steps);
            let (model, r) = train_vae(&cfg, |step, loss| {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.2}  {:.1} steps/s", step as f64 / started.elapsed().as_secs_f64().max(1e-9)));
            })?;
            bar.finish();
            println!(
                "{} test digits ({}): ELBO {:.2} nats/image (log-likelihood {:.2}, KL {:.2}); log p(x) >= {:.2} (k = {})",
                r.test_images, r.test_data, r.test_elbo, r.test_log_likelihood, r.test_kl, r.test_log_px, r.iw_samples
            );
            println!("{} steps, {:.1} ms/step, {} parameters", r.steps, r.ms_per_step, r.parameters);
            let test = vae_data(cfg.seed, cfg.data_dir.as_deref())?.1;
            for p in vae_pictures(&model, &test, cfg.seed, &out)? {
                println!("picture {}", p.display());
            }
            serde_json::to_string(&r)?
        }
        _ => {
            use kiln_models::frechet::{score_samples, train_feature_net};
            use kiln_models::gan::{generate, train_dcgan, DcganConfig, GanObjective, GeneratorLoss};
            let objective = match a.loss.as_deref() {
                None | Some("nonsaturating") => GanObjective::Standard(GeneratorLoss::NonSaturating),
                Some("minimax") => GanObjective::Standard(GeneratorLoss::Minimax),
                Some("wgan-gp") => GanObjective::WganGp { lambda: 10.0, n_critic: 5 },
                Some(other) => bail!("--loss {other}: dcgan trains with nonsaturating, minimax or wgan-gp"),
            };
            let d = DcganConfig::default();
            let lr = a.lr.unwrap_or(if matches!(objective, GanObjective::WganGp { .. }) { 1e-4 } else { d.lr });
            let cfg = DcganConfig { dataset: a.dataset.clone(), objective, epochs: a.epochs.map(|e| e as usize).unwrap_or(d.epochs), lr, seed: a.seed, data_dir: a.data_dir.clone(), ..d };
            // The classifier whose features the distance uses, trained on the same data set first.
            let split = kiln_data::load_split(&cfg.dataset, cfg.data_dir.as_deref(), cfg.seed)?;
            let labels = |s: &kiln_data::ArrayDataset| match &s.targets {
                kiln_data::Targets::Classes { labels, .. } => labels.clone(),
                _ => Vec::new(),
            };
            let (classifier, accuracy) = train_feature_net((&split.train.x, &labels(&split.train)), (&split.test.x, &labels(&split.test)), 1500, cfg.seed)?;
            let (real_features, _) = classifier.describe_images(&split.test.x)?;
            println!("feature classifier (for the Frechet distance; not Inception): {:.1}% test accuracy", 100.0 * accuracy);
            let bar = ProgressBar::new_spinner();
            let mut scores = Vec::new();
            let (_, _, epochs) = train_dcgan(
                &cfg,
                |step, dl, gl| {
                    bar.set_message(format!("step {step}  D loss {dl:.3}  G loss {gl:.3}"));
                    bar.tick();
                },
                |epoch, g| {
                    let grid = generate(g, 64, 7)?;
                    kiln_models::plot::image_grid_png(&out.join(format!("epoch-{epoch}.png")), &grid, 28, 8, 2).map_err(|e| kiln_graph::KilnError::Data(e.to_string()))?;
                    let s = score_samples(&classifier, &generate(g, 10_000, 11)?, &real_features)?;
                    let (classes, largest) = s.spread();
                    // Through the bar so that it stays on screen, and to a log as it happens.
                    bar.suspend(|| eprintln!("epoch {epoch}: Frechet distance {:.2} on the classifier's features; samples in {classes} classes, the largest {:.1}%", s.frechet, 100.0 * largest));
                    scores.push(s);
                    Ok(())
                },
            )?;
            bar.finish_and_clear();
            for (e, s) in epochs.iter().zip(&scores) {
                let (classes, largest) = s.spread();
                println!(
                    "epoch {}: D loss {:.3}, G loss {:.3}, {:.0} s; Frechet distance {:.2}; samples in {classes} classes, the largest {:.1}%",
                    e.epoch,
                    e.d_loss,
                    e.g_loss,
                    e.seconds,
                    s.frechet,
                    100.0 * largest
                );
            }
            println!("pictures {}/epoch-N.png (fixed noise)", out.display());
            serde_json::json!({ "model": "dcgan", "dataset": cfg.dataset, "epochs": epochs.len(), "frechet": scores.iter().map(|s| s.frechet).collect::<Vec<_>>(), "class_shares": scores.iter().map(|s| &s.class_shares).collect::<Vec<_>>(), "classifier_accuracy": accuracy }).to_string()
        }
    };
    if a.json {
        println!("{json}");
    }
    Ok(())
}

fn train_siamese_model(a: &TrainArgs) -> Result<()> {
    use kiln_models::siamese::{pca_2d, train_siamese, MetricLoss, Representation, SiameseConfig, Trunk};
    use kiln_nn::metric_learning::Mining;
    let mining = match a.mining.as_deref() {
        Some("semi-hard") => Mining::SemiHard,
        Some("hard") => Mining::Hard,
        _ => Mining::All,
    };
    let (loss, default_margin) = match a.loss.as_deref() {
        Some("contrastive") => (MetricLoss::Contrastive, 1.0),
        None | Some("triplet") => (MetricLoss::Triplet(mining), 0.2),
        Some(other) => bail!("--loss {other}: siamese trains with triplet or contrastive"),
    };
    let d = SiameseConfig::default();
    let cfg = SiameseConfig {
        loss,
        margin: a.margin.unwrap_or(default_margin),
        steps: a.steps.unwrap_or(d.steps),
        dim: a.hidden.as_ref().and_then(|h| h.first().map(|&v| v as usize)).unwrap_or(d.dim),
        per_class: a.batch_size.map(|b| b as usize).unwrap_or(d.per_class),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        augment: a.augment.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?.unwrap_or(d.augment),
        weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
        trunk: {
            let trunk = match a.trunk.as_deref() {
                Some("deep-bn") => Trunk::DEEP_BN,
                Some(_) => Trunk::SMALL,
                None => d.trunk,
            };
            let channels = match a.channels.as_deref() {
                None => trunk.channels,
                Some(&[first, second, third]) => [first as usize, second as usize, third as usize],
                Some(other) => bail!("--channels takes the three stages' channels, as 32,64,64 (got {} values)", other.len()),
            };
            Trunk { channels, ..trunk }
        },
        adapt_batch_norm: d.adapt_batch_norm && !a.no_adapt_bn,
        representation: match a.score_on.as_deref() {
            Some("features") => Representation::Features,
            Some(_) => Representation::Embedding,
            None => d.representation,
        },
        data_dir: a.data_dir.clone(),
        ..d
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs/siamese-fashion-mnist"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("kiln: training siamese ({}) on Fashion-MNIST classes other than {:?} with {}", cfg.loss.name(), cfg.held_out, kiln_wgpu::gpu()?.adapter_name());
    let bar = steps_bar(cfg.steps);
    let started = std::time::Instant::now();
    let (_, r, held) = train_siamese(&cfg, |step, loss| {
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4}  {:.0} images/s", (step as usize * cfg.per_class * (10 - cfg.held_out.len())) as f64 / started.elapsed().as_secs_f64().max(1e-9)));
    })
    .context("training siamese")?;
    bar.finish();
    for (name, s) in [("trained", &r.trained), ("untrained", &r.untrained)] {
        println!(
            "{name:<9} unseen classes {:?} ({}): ROC AUC {:.3}; threshold {:.3} (dev accuracy {:.3}), test accuracy {:.3}; {}-way one-shot {:.3}",
            r.held_out, r.representation, s.auc, s.threshold, s.dev_accuracy, s.test_accuracy, r.ways, s.one_shot
        );
    }
    println!("{} steps, {:.1} ms/step, {} parameters; weights kept from step {} (dev-half AUC {:.3})", r.steps, r.ms_per_step, r.parameters, r.best_step, r.best_dev_auc);
    let picture = out.join("embeddings.png");
    kiln_models::plot::scatter_png(&picture, &pca_2d(&held.embeddings, held.dim), &held.labels).with_context(|| format!("writing {}", picture.display()))?;
    println!("picture {}", picture.display());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `kiln style`: neural style transfer (kiln_models::style) with a progress bar of the loss terms.
fn style(a: &StyleArgs) -> Result<()> {
    use kiln_data::picture::load_picture_or_bundled;
    use kiln_models::style::{transfer, StyleConfig, VggFeatures};
    kiln_wgpu::select_adapter(a.adapter.as_deref())?;
    let content = load_picture_or_bundled(&a.content).context("reading the content picture")?;
    let style_picture = load_picture_or_bundled(&a.style).context("reading the style picture")?;
    let longer = content.h.max(content.w) as f64;
    let scale = a.size as f64 / longer;
    let (h, w) = (((content.h as f64 * scale).round() as usize).max(1), ((content.w as f64 * scale).round() as usize).max(1));
    let (content, style_picture) = (content.resized(h, w), style_picture.resized(h, w));
    let net = match &a.weights {
        Some(path) => VggFeatures::from_checkpoint(path)?,
        None => VggFeatures::random(a.divisor as usize, a.seed)?,
    };
    eprintln!("kiln: style transfer at {w} x {h} on {}; features: {}", kiln_wgpu::gpu()?.adapter_name(), net.source);
    let optimizer: kiln_models::style::StyleOptimizer = a.optimizer.parse().map_err(anyhow::Error::msg)?;
    let cfg = StyleConfig {
        content_weight: a.content_weight,
        style_weight: a.style_weight,
        tv_weight: a.tv_weight,
        steps: a.steps,
        lr: a.lr.unwrap_or(if optimizer == kiln_models::style::StyleOptimizer::Lbfgs { 1.0 } else { 0.03 }),
        optimizer,
        from_content: !a.from_noise,
        seed: a.seed,
        ..Default::default()
    };
    let bar = steps_bar(a.steps);
    let (out, r) = transfer(&net, &content, &style_picture, &cfg, |step, t| {
        bar.set_position(step);
        bar.set_message(format!("content {:.3e}  style {:.3e}  tv {:.3e}", t.content, t.style, t.tv));
    })?;
    bar.finish();
    out.save_png(&a.out)?;
    println!("content {:.4e} -> {:.4e}, style {:.4e} -> {:.4e}, tv {:.4e} -> {:.4e}", r.first.content, r.last.content, r.first.style, r.last.style, r.first.tv, r.last.tv);
    println!("{} steps, {:.1} ms/step; features: {}", r.steps, r.ms_per_step, r.features);
    println!("picture {}", a.out.display());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `kiln sample`: text from a char-rnn checkpoint (and the vocab.json beside it).
fn sample(checkpoint: &std::path::Path, prefix: &str, length: usize, temperature: f32, top_k: Option<usize>, seed: u64, count: usize) -> Result<()> {
    let (kind, model) = kiln_models::lm::load_text_model(checkpoint).with_context(|| format!("loading {}", checkpoint.display()))?;
    if let (true, kiln_models::lm::TextModel::Recurrent(m)) = (kind == "names", &model) {
        for name in kiln_models::names::sample_words(m, count, temperature, seed, 24)? {
            println!("{name}");
        }
        return Ok(());
    }
    println!("{prefix}{}", model.as_window_model().sample(prefix, length, temperature, top_k, seed)?);
    Ok(())
}

/// Set by the first Ctrl-C (the run saves where it is and stops after the current step); a second one exits
/// at once.
/// Set once Ctrl-C has asked a run to stop (see [`ctrl_c_flag`]).
static STOP_REQUESTED: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

fn ctrl_c_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    let _ = STOP_REQUESTED.set(flag.clone());
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nkiln: stopping after this step and saving (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

fn info(adapter: Option<String>) -> Result<()> {
    let adapters = kiln_wgpu::list_adapters();
    if adapters.is_empty() {
        println!("no adapters visible (WGPU_BACKEND={})", std::env::var("WGPU_BACKEND").unwrap_or_default());
    }
    for a in &adapters {
        println!("[{}] {} ({}, {}) driver: {}", a.index, a.name, a.backend, a.device_type, a.driver);
        println!("    features: {}", if a.features.is_empty() { "none of those Kiln uses".to_string() } else { a.features.join(", ") });
        for (k, v) in &a.limits {
            println!("    {k}: {v}");
        }
    }
    kiln_wgpu::select_adapter(adapter.as_deref())?;
    let g = kiln_wgpu::gpu()?;
    println!("Kiln uses: {}", g.adapter_name());
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    match a.distributed.as_deref() {
        None => train_on(a, None),
        Some("mpi") => train_mpi(a),
        Some(other) => bail!("--distributed {other:?}: the backend is mpi (under mpirun)"),
    }
}

/// One rank of `--distributed mpi`: its adapter, then the run. A rank's error ends every rank (MPI_Abort), so
/// none waits for it in a collective.
#[cfg(feature = "mpi")]
fn train_mpi(mut a: TrainArgs) -> Result<()> {
    use kiln_nn::parallel::Collective;
    let world = std::rc::Rc::new(distributed::MpiWorld::init()?);
    let (rank, size) = (world.rank(), world.size());
    let result = (|| {
        a.devices = Some(rank_adapter(&world, a.adapter.take(), a.devices.take())?);
        train_on(a, Some(kiln_nn::parallel::Distributed(world.clone())))
    })();
    // A Ctrl-C is agreed between the ranks: every rank stops after the same step, rank 0 saves, none waits.
    let interrupted = STOP_REQUESTED.get().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed));
    if let (Err(e), true, false) = (&result, size > 1, interrupted) {
        eprintln!("error (rank {rank} of {size}; ending every rank): {e:#}");
        world.abort();
    }
    result
}

/// A rank's `--devices`: what it was given (`--devices`, or `--adapter` for one), else its rank among the ranks
/// of its machine modulo the adapters of one kind there.
#[cfg(feature = "mpi")]
fn rank_adapter(world: &distributed::MpiWorld, adapter: Option<String>, devices: Option<String>) -> Result<String> {
    use kiln_nn::parallel::Collective;
    if let Some(d) = devices.or(adapter) {
        return Ok(d);
    }
    let adapters = kiln_nn::parallel::distinct_adapters();
    if adapters.is_empty() {
        bail!("rank {} sees no adapter", world.rank());
    }
    Ok(adapters[world.local_rank() % adapters.len()].to_string())
}

#[cfg(not(feature = "mpi"))]
fn train_mpi(_a: TrainArgs) -> Result<()> {
    bail!("--distributed mpi needs a kiln built with the mpi feature: install OpenMPI and libclang (apt-get install libopenmpi-dev openmpi-bin libclang-dev), then cargo build --release -p kiln-cli --features mpi")
}

fn train_on(a: TrainArgs, distributed: Option<kiln_nn::parallel::Distributed>) -> Result<()> {
    kiln_wgpu::select_adapter(a.adapter.as_deref())?;
    let rank0 = distributed.as_ref().is_none_or(|d| d.0.rank() == 0);
    if OWN_LOOP_MODELS.iter().any(|m| m.0 == a.model) || OWN_LOOP_DATASETS.iter().any(|d| d.0 == a.dataset) {
        if distributed.is_some() {
            bail!("--distributed: distributed training covers the models of `kiln train`'s reusable loop; {} has a loop of its own", a.model);
        }
        if a.devices.is_some() {
            bail!(
                "--devices: data-parallel training covers the models of `kiln train`'s reusable loop ({}); {} has a loop of its own",
                kiln_models::MODELS.iter().map(|m| m.0).collect::<Vec<_>>().join(", "),
                a.model
            );
        }
        return train_language_model(&a);
    }
    if a.devices.is_some() && a.adapter.is_some() {
        bail!("--devices names the adapters itself; leave out --adapter");
    }
    if a.sync_bn && a.devices.is_none() && distributed.is_none() {
        bail!("--sync-bn synchronises batch norm across data-parallel replicas: give --devices or --distributed too");
    }
    if let Some(dir) = &a.data_dir {
        if !dir.is_dir() {
            bail!("--data-dir {} is not a directory", dir.display());
        }
    }
    let optimizer = a.optimizer.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
    let schedule = a.schedule.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", a.model, a.dataset)));
    let cfg = TrainConfig {
        epochs: a.epochs.map(|v| v as usize),
        batch_size: a.batch_size.map(|v| v as usize),
        lr: a.lr,
        optimizer,
        weight_decay: a.weight_decay,
        schedule,
        seed: a.seed,
        hidden: a.hidden.as_ref().map(|h| h.iter().map(|&v| v as usize).collect()),
        degree: a.degree.map(|v| v as usize),
        feature: a.feature,
        train_limit: a.train_limit.map(|v| v as usize),
        out_dir: Some(out.clone()),
        data_dir: a.data_dir.clone(),
        from: a.from.clone(),
        freeze: a.freeze.clone(),
        resume: a.resume,
        patience: a.patience.map(|p| p as usize),
        augment: a.augment.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?,
        depth: a.depth.map(|d| d as usize),
        checkpoint_every_s: a.checkpoint_every,
        interrupt: Some(ctrl_c_flag()?),
        devices: match &a.devices {
            Some(list) => kiln_nn::parallel::open_devices(list)?,
            None => Vec::new(),
        },
        distributed,
        sync_batch_norm: a.sync_bn,
        ..TrainConfig::new(&a.model, &a.dataset)
    };
    if a.checkpoint_every.is_some_and(|s| s.is_nan() || s < 0.0) {
        bail!("--checkpoint-every must be a number of seconds >= 0");
    }
    // The run's devices (or the default one): the anomaly setting is per device.
    let main_device = match cfg.devices.first() {
        Some(d) => d.clone(),
        None => kiln_graph::backend::Device::default_device()?,
    };
    if a.anomaly {
        for d in cfg.devices.iter().chain(std::iter::once(&main_device)) {
            kiln_graph::anomaly::set_enabled(d, true);
        }
    }
    match (cfg.devices.len(), &cfg.distributed) {
        (_, Some(d)) if rank0 => eprintln!("kiln: training {} on {}, {:?}, on {}", a.model, a.dataset, d, cfg.devices.iter().map(|d| d.describe()).collect::<Vec<_>>().join(", ")),
        (_, Some(_)) => {}
        (0 | 1, None) => eprintln!("kiln: training {} on {} with {}", a.model, a.dataset, main_device.adapter_name()),
        (n, None) => eprintln!("kiln: training {} on {} data-parallel over {n} devices: {}", a.model, a.dataset, cfg.devices.iter().map(|d| d.describe()).collect::<Vec<_>>().join(", ")),
    }
    // Rank 0 alone shows progress and the summary (every rank prints its own errors).
    let bar = if rank0 { ProgressBar::new(1) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}").expect("static template").progress_chars("=> "));
    let report = kiln_models::run(&cfg, |p: &Progress| {
        bar.set_length(p.total_steps);
        bar.set_position(p.step);
        bar.set_prefix(format!("epoch {}/{}", p.epoch, p.epochs));
        match &p.epoch_end {
            None => bar.set_message(format!("loss {:.4}  {:.0} samples/s", p.loss, p.samples_per_s)),
            Some(r) => bar.set_message(format!("train loss {:.4}  dev loss {:.4}  dev {:.4}  {:.0} samples/s", r.train_loss, r.dev_loss, r.dev_metric, r.samples_per_s)),
        }
    })
    .map_err(|e| match e {
        kiln_graph::KilnError::Interrupted(at) => {
            bar.abandon();
            anyhow::anyhow!("{at}; {} holds this point: continue with the same command and --resume", out.join("resume.safetensors").display())
        }
        e => anyhow::Error::new(e).context(format!("training {} on {}", a.model, a.dataset)),
    })?;
    bar.finish();
    if !rank0 {
        return Ok(());
    }
    print_summary(&report, &out);
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// `kiln bench --filter allreduce --distributed mpi`: every rank runs the family; rank 0 prints and writes.
#[cfg(feature = "mpi")]
fn bench_mpi(opts: kiln_benches::suite::SuiteOptions, adapter: Option<String>, json: Option<PathBuf>) -> Result<()> {
    use kiln_nn::parallel::Collective;
    let world = std::rc::Rc::new(distributed::MpiWorld::init()?);
    let (rank, size) = (world.rank(), world.size());
    let opts = kiln_benches::suite::SuiteOptions { across: Some(kiln_nn::parallel::Distributed(world.clone())), ..opts };
    let result = (|| -> Result<()> {
        let adapter = rank_adapter(&world, adapter, None)?;
        if rank == 0 {
            return bench(&opts, Some(adapter), json);
        }
        kiln_wgpu::select_adapter(Some(&adapter))?;
        let roofs = kiln_benches::suite::Roofs { fma_gflops: 1.0, copy_gbps: 1.0 };
        kiln_benches::suite::run_suite(&opts, roofs, &mut |_| {})?;
        Ok(())
    })();
    if let (Err(e), true) = (&result, size > 1) {
        eprintln!("error (rank {rank} of {size}; ending every rank): {e:#}");
        world.abort();
    }
    result
}

#[cfg(not(feature = "mpi"))]
fn bench_mpi(_opts: kiln_benches::suite::SuiteOptions, _adapter: Option<String>, _json: Option<PathBuf>) -> Result<()> {
    bail!("--distributed mpi needs a kiln built with the mpi feature: install OpenMPI and libclang (apt-get install libopenmpi-dev openmpi-bin libclang-dev), then cargo build --release -p kiln-cli --features mpi")
}

fn bench(opts: &kiln_benches::suite::SuiteOptions, adapter: Option<String>, json: Option<PathBuf>) -> Result<()> {
    kiln_wgpu::select_adapter(adapter.as_deref())?;
    let g = kiln_wgpu::gpu()?;
    println!("adapter: {}", g.adapter_name());
    let roofs = kiln_benches::suite::measure_roofs()?;
    println!("compute roof (FMA chains): {:.1} GFLOP/s   memory roof (64 MiB copy): {:.2} GB/s", roofs.fma_gflops, roofs.copy_gbps);
    let mut table = kiln_benches::suite::Table::default();
    let mut print = |r: &kiln_benches::suite::Record| table.print(r);
    let mut records = kiln_benches::suite::run_suite(opts, roofs, &mut print)?;
    if let Some(path) = json {
        // Ceilings first, as records of their own, then every measurement.
        let roof = |kernel: &str, gflops: Option<f64>, gbps: Option<f64>| kiln_benches::suite::Record {
            family: "roof".into(),
            kernel: kernel.into(),
            variant: "ceiling".into(),
            valid: true,
            gflops,
            gbps,
            roof_fraction: Some(1.0),
            adapter: g.adapter_name(),
            ..Default::default()
        };
        records.insert(0, roof("copy", None, Some(roofs.copy_gbps)));
        records.insert(0, roof("fma", Some(roofs.fma_gflops), None));
        std::fs::write(&path, serde_json::to_string_pretty(&records)?).with_context(|| format!("writing {}", path.display()))?;
        println!("\nwrote {} records to {}", records.len(), path.display());
    }
    Ok(())
}

/// `kiln detect`: a YOLO checkpoint on a picture of one's own.
fn detect(checkpoint: &std::path::Path, image: &std::path::Path, out: Option<PathBuf>, min_score: f32, iou: f32, json: bool) -> Result<()> {
    if !(0.0..1.0).contains(&min_score) || !(0.0..=1.0).contains(&iou) {
        bail!("--min-score must be in [0, 1) and --iou in [0, 1] (got {min_score} and {iou})");
    }
    // A YOLO or a two-stage checkpoint: its metadata says which.
    let kind = kiln_nn::checkpoint::load(checkpoint).ok().and_then(|ck| ck.metadata.get("kiln.model").cloned()).unwrap_or_default();
    let picture = kiln_data::picture::load_picture(image)?;
    let (found, masks, size, class_names) = if kind == "rcnn" {
        let (model, size, names) = kiln_models::rcnn::load_two_stage(checkpoint)?;
        let small = picture.resized(size, size);
        let mut found = model.detect(&kiln_graph::Tensor::from_slice(&small.pixels, &[1, 3, size, size])?)?.remove(0);
        found.retain(|d| d.detection.score > min_score);
        let masks: Vec<Vec<u8>> = found.iter().map(|d| d.mask.clone()).collect();
        (found.into_iter().map(|d| d.detection).collect::<Vec<_>>(), masks, size, names)
    } else {
        let (model, info) = kiln_models::yolo::load_yolo(checkpoint)?;
        let size = info.size;
        let small = picture.resized(size, size);
        let pred = kiln_graph::no_grad(|| model.forward(&kiln_graph::Tensor::from_slice(&small.pixels, &[1, 3, size, size])?))?;
        (model.detect(&pred, 0, size, min_score, iou)?, Vec::new(), size, info.class_names)
    };
    let info = kiln_models::yolo::YoloInfo { size, class_names };
    let small = picture.resized(size, size);
    // Boxes back in the picture's own pixels.
    let (sx, sy) = (picture.w as f32 / size as f32, picture.h as f32 / size as f32);
    let out = out.unwrap_or_else(|| image.with_extension("detections.png"));
    let overlays = found.iter().enumerate().map(|(i, d)| kiln_models::plot::Overlay { bbox: Some(d.bbox), class: d.class, mask: masks.get(i).map(|m| &m[..]) }).collect();
    kiln_models::plot::scenes_png(&out, size, (512 / size).max(1), &[(&small.pixels[..], overlays)]).with_context(|| format!("writing {}", out.display()))?;
    let listed: Vec<serde_json::Value> = found
        .iter()
        .map(|d| {
            let b = [d.bbox[0] * sx, d.bbox[1] * sy, d.bbox[2] * sx, d.bbox[3] * sy];
            serde_json::json!({ "class": d.class, "name": info.class_names[d.class as usize], "score": d.score, "bbox": b })
        })
        .collect();
    println!("{}: {} objects above {min_score} ({} x {} pixels, read at {size} x {size}); picture {}", image.display(), found.len(), picture.w, picture.h, out.display());
    for v in &listed {
        println!("  {:<14} score {:.3}  box {}", v["name"].as_str().unwrap_or(""), v["score"].as_f64().unwrap_or(0.0), v["bbox"]);
    }
    if json {
        println!("{}", serde_json::json!({ "image": image.display().to_string(), "detections": listed }));
    }
    Ok(())
}

/// `kiln segment`: a segmentation checkpoint on a picture of one's own.
fn segment(checkpoint: &std::path::Path, image: &std::path::Path, out: Option<PathBuf>, json: bool) -> Result<()> {
    let (net, info) = kiln_models::segment::load_segmentation(checkpoint)?;
    let picture = kiln_data::picture::load_picture(image)?;
    let s = info.size;
    let small = picture.resized(s, s);
    let logits = kiln_graph::no_grad(|| net.forward(&kiln_graph::Tensor::from_slice(&small.pixels, &[1, 3, s, s])?))?;
    let classes = logits.shape()[1];
    let logits = logits.to_vec()?;
    let labels: Vec<usize> = (0..s * s).map(|p| (0..classes).max_by(|&a, &b| logits[a * s * s + p].total_cmp(&logits[b * s * s + p])).unwrap_or(0)).collect();
    let masks: Vec<(u32, Vec<u8>)> = (1..classes).map(|c| (c as u32 - 1, labels.iter().map(|&l| u8::from(l == c)).collect::<Vec<u8>>())).filter(|(_, m)| m.contains(&1)).collect();
    let out = out.unwrap_or_else(|| image.with_extension("segments.png"));
    let overlays = masks.iter().map(|(c, m)| kiln_models::plot::Overlay { bbox: None, class: *c, mask: Some(&m[..]) }).collect();
    kiln_models::plot::scenes_png(&out, s, (512 / s).max(1), &[(&small.pixels[..], overlays)]).with_context(|| format!("writing {}", out.display()))?;
    let covered: Vec<serde_json::Value> =
        masks.iter().map(|(c, m)| serde_json::json!({ "class": c, "name": info.class_names[*c as usize], "share": m.iter().filter(|&&v| v == 1).count() as f64 / (s * s) as f64 })).collect();
    println!("{}: {} classes found ({} x {} pixels, read at {s} x {s}); picture {}", image.display(), covered.len(), picture.w, picture.h, out.display());
    for v in &covered {
        println!("  {:<14} {:.1}% of the picture", v["name"].as_str().unwrap_or(""), 100.0 * v["share"].as_f64().unwrap_or(0.0));
    }
    if json {
        println!("{}", serde_json::json!({ "image": image.display().to_string(), "classes": covered }));
    }
    Ok(())
}

/// The input shape of a zoo model: `--input` CxHxW, else the model's default.
fn zoo_input(model: &str, input: Option<&str>) -> Result<[usize; 3]> {
    let default = kiln_models::zoo::ZOO.iter().find(|z| z.0 == model).map(|z| z.1);
    let input: [usize; 3] = match input {
        Some(text) => {
            let dims: Vec<usize> =
                text.split(['x', 'X', ',']).map(|d| d.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|_| anyhow::anyhow!("--input {text:?}: expected CxHxW, e.g. 3x224x224"))?;
            match dims[..] {
                [c, h, w] if c > 0 && h > 0 && w > 0 => [c, h, w],
                _ => bail!("--input {text:?}: expected three positive sizes CxHxW"),
            }
        }
        None => default.unwrap_or([3, 224, 224]),
    };
    Ok(input)
}

/// A zoo model, initialised with `seed` and untrained, written atomically to `path` (PyTorch's names).
fn save_untrained(model: &str, classes: usize, input: Option<&str>, seed: u64, path: &std::path::Path) -> Result<()> {
    let input = zoo_input(model, input)?;
    let mut vs = kiln_nn::VarStore::new(seed);
    kiln_models::zoo::build_named(&mut vs, model, input, classes, seed)?;
    vs.finish()?;
    let mut ck = vs.to_checkpoint()?;
    for (k, v) in [
        ("kiln.zoo_model", model.to_string()),
        ("kiln.classes", classes.to_string()),
        ("kiln.input", format!("{}x{}x{}", input[0], input[1], input[2])),
        ("kiln.seed", seed.to_string()),
        ("kiln.trained", "false".into()),
    ] {
        ck.metadata.insert(k.into(), v);
    }
    kiln_nn::checkpoint::save(path, &ck).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("kiln: untrained {model} ({} values, seed {seed}) written to {}", vs.num_values(), path.display());
    Ok(())
}

fn summary(model: &str, classes: usize, input: Option<&str>, json: bool, list_params: bool) -> Result<()> {
    let input = zoo_input(model, input)?;
    let mut vs = kiln_nn::VarStore::shapes_only();
    let net = kiln_models::zoo::build_named(&mut vs, model, input, classes, 0)?;
    let shape = [1, input[0], input[1], input[2]];
    let rows = kiln_models::zoo::summarize(&net, &shape).with_context(|| format!("{model} on a {}x{}x{} input", input[0], input[1], input[2]))?;
    let total = vs.num_values();
    println!("{model}: input {}x{}x{}, {classes} classes", input[0], input[1], input[2]);
    println!("{:<28} {:<44} {:>20} {:>12}", "name", "layer", "output shape", "params");
    println!("{}", "-".repeat(107));
    for r in &rows {
        println!("{:<28} {:<44} {:>20} {:>12}", r.name, r.layer, format!("{:?}", r.output_shape), r.params);
    }
    println!("{}", "-".repeat(107));
    println!("total parameters: {total}");
    // In state_dict order as torchvision has it: each module's parameters and buffers, its counters after.
    let mut listed: Vec<(String, Vec<usize>)> = vs.params().map(|p| (p.name().to_string(), p.shape().to_vec())).collect();
    for name in vs.counter_names() {
        let module = name.rsplit_once('.').map(|(m, _)| format!("{m}.")).unwrap_or_default();
        let at = listed.iter().rposition(|(n, _)| n.starts_with(&module)).map(|i| i + 1).unwrap_or(listed.len());
        listed.insert(at, (name.to_string(), Vec::new()));
    }
    let tensors: Vec<serde_json::Value> = listed.iter().map(|(name, shape)| serde_json::json!({ "name": name, "shape": shape })).collect();
    if list_params {
        println!();
        for (name, shape) in &listed {
            println!("{name:<48} {shape:?}");
        }
    }
    if json {
        let mut v = serde_json::json!({ "model": model, "classes": classes, "input": input, "params": total, "layers": rows });
        if list_params {
            v["tensors"] = serde_json::Value::Array(tensors);
        }
        println!("{v}");
    }
    Ok(())
}

fn eval(checkpoint: PathBuf, dataset: Option<String>, data_dir: Option<PathBuf>, adapter: Option<String>, json: bool, predictions: Option<PathBuf>) -> Result<()> {
    kiln_wgpu::select_adapter(adapter.as_deref())?;
    let r = kiln_models::evaluate_checkpoint(&checkpoint, dataset.as_deref(), data_dir).with_context(|| format!("evaluating {}", checkpoint.display()))?;
    println!("{} ({}) on the {} test split ({} samples) with {}", r.checkpoint, r.model, r.dataset, r.test_samples, r.adapter);
    println!("test loss {:.4}", r.test_loss);
    print_test_metrics(&r.test, r.test_samples);
    if let Some(path) = &predictions {
        r.predictions.write_csv(path)?;
        println!("per-sample predictions: {}", path.display());
    }
    if json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// Accuracy, confusion matrix and per-class scores, or MSE and R^2.
fn print_test_metrics(t: &kiln_models::train::TestMetrics, samples: usize) {
    if let Some(acc) = t.test_accuracy {
        println!("test accuracy {:.4} ({samples} samples), macro F1 {:.4}", acc, t.test_macro_f1.unwrap_or(0.0));
        print_confusion(&t.per_class.iter().map(|c| c.class.clone()).collect::<Vec<_>>(), &t.confusion);
        print_scores(&t.per_class);
    }
    if let (Some(mse), Some(r2)) = (t.test_mse, t.test_r2) {
        println!("test MSE {mse:.2}  test R^2 {r2:.4}");
    }
}

fn print_confusion(classes: &[String], confusion: &[Vec<u64>]) {
    println!();
    println!("confusion matrix (rows: true class, columns: predicted)");
    let names: Vec<String> = classes.iter().map(|c| c.chars().take(6).collect()).collect();
    print!("{:>8}", "");
    for n in &names {
        print!("{n:>7}");
    }
    println!();
    for (n, row) in names.iter().zip(confusion) {
        print!("{n:>8}");
        for v in row {
            print!("{v:>7}");
        }
        println!();
    }
}

fn print_scores(per_class: &[kiln_models::train::ClassReport]) {
    println!();
    println!("{:>12} {:>9} {:>9} {:>9} {:>8}", "class", "precision", "recall", "f1", "support");
    for c in per_class {
        println!("{:>12} {:>9.4} {:>9.4} {:>9.4} {:>8}", c.class, c.precision, c.recall, c.f1, c.support);
    }
}

fn print_summary(r: &TrainReport, out: &std::path::Path) {
    println!();
    println!("model {} on {} — {} epochs, {} steps, {:.1} s on {} ({})", r.model, r.dataset, r.epochs, r.steps, r.seconds, r.adapter, r.backend);
    println!("train loss {:.4}  dev loss {:.4}  test loss {:.4}", r.train_loss, r.dev_loss, r.test_loss);
    print_test_metrics(&r.test, r.test_samples);
    if let (Some(ne), Some(gd)) = (r.normal_equation_cost, r.train_cost) {
        println!("training cost J: gradient descent {gd:.3}, normal equation {ne:.3} (ratio {:.4})", gd / ne);
    }
    println!();
    println!(
        "{:.2} ms/step, {:.0} samples/s, {} submits/step, first step done after {:.1} s, {} parameters, peak GPU memory {:.1} KiB",
        r.ms_per_step,
        r.samples_per_s,
        r.submits_per_step.map(|v| format!("{v:.2}")).unwrap_or_else(|| "(not measured)".into()),
        r.seconds_to_first_step,
        r.parameters,
        r.peak_gpu_bytes as f64 / 1024.0
    );
    if r.stopped_early {
        println!("stopped early: no dev improvement since epoch {}", r.best_epoch);
    }
    if !r.frozen.is_empty() {
        println!("frozen: {}", r.frozen.join(", "));
    }
    if let Some(p) = &r.data_parallel {
        let ranks = match &p.communicator {
            Some(c) => format!("{c}, "),
            None => String::new(),
        };
        println!(
            "data-parallel over {}{} devices ({}): all-reduce of {:.1} KiB of gradients {:.2} ms/step ({:.1}% of the step; {:.0}% of its copies started during the backward), replicas equal (checksum {})",
            ranks,
            p.devices.len(),
            p.devices.join(", "),
            p.gradient_bytes as f64 / 1024.0,
            p.all_reduce_ms_per_step,
            100.0 * p.communication_share,
            100.0 * p.copies_started_in_backward,
            p.checksum
        );
    }
    println!("run directory {}: metrics.csv, loss.png, last.safetensors, best.safetensors (epoch {}, dev {:.4})", out.display(), r.best_epoch, r.best_dev_metric);
}
