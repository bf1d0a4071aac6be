//! kiln-data: the real data sets the examples train on, seeded synthetic scenes (captioning, VQA), splits, feature scaling, polynomial features, and
//! batching: the `Dataset` trait (any sample kind), collators and the `DataLoader` (loader.rs). Samples are
//! host data; a collated batch uploads itself in one write.

// Shapes are written in brackets ([n, c, h, w]) throughout the docs; they are not links.
#![allow(rustdoc::broken_intra_doc_links)]

mod dataset;
mod error;
mod idx;
mod loader;
mod loaders;
mod objects;
pub mod picture;
mod prep;
mod scenes;
mod text;

pub use dataset::{ArrayDataset, Targets};
pub use error::{DataError, Result};
pub use idx::{parse_idx, read_idx, IdxArray};
pub use loader::{
    Collate, DataLoader, Dataset, Detection, Epoch, HostArray, HostBatch, HostData, Labeled, LoaderOptions, PadSequences, Pair, Sequence, StackDetections, StackPairs, StackRows, StackTriplets,
    Target, Triplet,
};
pub use loaders::{load, load_breast_cancer, load_diabetes, load_digits, load_fashion_mnist, load_iris, load_mnist10k, load_split, load_wine, parse_sklearn_csv, DATASETS, FASHION_MNIST_SYSTEM_DIR};
pub use objects::{ObjectScene, ObjectSceneConfig, ObjectScenes, ObjectSource, ObjectSplit, PastedObject};
pub use prep::{polynomial_features, Batches, MeanNormalizer, Split, Standardizer};
pub use scenes::{
    CollateCaptions, CollateQuestions, Question, Scene, SceneObject, SceneQuestions, SceneVocab, Scenes, COLOURS, QUESTION_KINDS, SCENE_COLUMNS, SCENE_EOS, SCENE_PAD, SCENE_SIZE, SCENE_SOS,
    SCENE_UNK, SHAPES,
};
pub use text::{load_cmudict, load_first_names, load_moby_dick, split_tail, split_words, CharVocab, CharWindows, Pronunciations, StreamWindows, WordSequences};
