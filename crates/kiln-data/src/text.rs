//! Text for the sequence models: the shipped corpora (Moby-Dick, first names), a character vocabulary with
//! PyTorch-style special tokens, and next-character windows as a [`Dataset`] of [`Sequence`]s.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::loader::{Dataset, Sequence};

const MOBY_DICK: (&str, &[u8]) = ("moby-dick.txt.gz", include_bytes!("../../../data/text/moby-dick.txt.gz"));
const NAMES_FEMALE: (&str, &[u8]) = ("names-female.txt.gz", include_bytes!("../../../data/text/names-female.txt.gz"));
const NAMES_MALE: (&str, &[u8]) = ("names-male.txt.gz", include_bytes!("../../../data/text/names-male.txt.gz"));
const CMUDICT: (&str, &[u8]) = ("cmudict.txt.gz", include_bytes!("../../../data/text/cmudict.txt.gz"));

/// A shipped text file, or the file of the same name in `dir` (or `KILN_DATA`) when there is one there.
fn read_text((name, bundled): (&str, &[u8]), dir: Option<&Path>) -> Result<(String, String)> {
    let dir = dir.map(Path::to_path_buf).or_else(|| std::env::var_os("KILN_DATA").map(Into::into));
    let (file, bytes) = match dir.map(|d| d.join(name)).filter(|p| p.exists()) {
        Some(p) => (p.display().to_string(), std::fs::read(&p).map_err(|e| DataError::Io { file: p.display().to_string(), source: e })?),
        None => (format!("(bundled) {name}"), bundled.to_vec()),
    };
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).map_err(|e| DataError::Corrupt { file: file.clone(), problem: format!("not gzip-compressed UTF-8 text: {e}") })?;
    Ok((file, text))
}

/// Herman Melville's *Moby-Dick* (1,190,317 characters, public domain).
pub fn load_moby_dick(dir: Option<&Path>) -> Result<String> {
    let (file, text) = read_text(MOBY_DICK, dir)?;
    if text.len() < 1000 {
        return Err(DataError::Corrupt { file, problem: format!("{} characters: truncated", text.chars().count()) });
    }
    Ok(text)
}

/// English first names, female then male, one per entry, as shipped (8,849).
pub fn load_first_names(dir: Option<&Path>) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for source in [NAMES_FEMALE, NAMES_MALE] {
        let (file, text) = read_text(source, dir)?;
        let before = names.len();
        names.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
        if names.len() == before {
            return Err(DataError::Corrupt { file, problem: "no names".into() });
        }
    }
    Ok(names)
}

/// A word of the CMU Pronouncing Dictionary and every pronunciation it lists (ARPAbet phonemes with their
/// stress digits, as shipped; alternates in the dictionary's order).
#[derive(Clone, Debug, PartialEq)]
pub struct Pronunciations {
    pub word: String,
    pub variants: Vec<Vec<String>>,
}

/// The CMU Pronouncing Dictionary (133,784 entries, BSD-2-Clause, Carnegie Mellon University): one
/// [`Pronunciations`] per word, the alternates (`WORD(1)`, `WORD(2)`) gathered under it, words lower-cased.
/// A line that is not `WORD  PH PH ...` is an error naming the file and the line.
pub fn load_cmudict(dir: Option<&Path>) -> Result<Vec<Pronunciations>> {
    let (file, text) = read_text(CMUDICT, dir)?;
    let mut out: Vec<Pronunciations> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with(";;;") {
            continue;
        }
        let (head, phones) = line.split_once("  ").ok_or_else(|| DataError::Corrupt { file: file.clone(), problem: format!("line {}: {line:?} is not `WORD  PHONEMES`", i + 1) })?;
        let word = match head.find('(') {
            Some(p) if head.ends_with(')') => &head[..p],
            _ => head,
        }
        .to_lowercase();
        let phones: Vec<String> = phones.split_whitespace().map(str::to_string).collect();
        if word.is_empty() || phones.is_empty() {
            return Err(DataError::Corrupt { file, problem: format!("line {}: {line:?} has no word or no phonemes", i + 1) });
        }
        match at.get(&word) {
            Some(&k) => out[k].variants.push(phones),
            None => {
                at.insert(word.clone(), out.len());
                out.push(Pronunciations { word, variants: vec![phones] });
            }
        }
    }
    if out.len() < 1000 {
        return Err(DataError::Corrupt { file, problem: format!("{} words: truncated", out.len()) });
    }
    Ok(out)
}

/// A character vocabulary: the special tokens `<pad>` (0), `<sos>` (1), `<eos>` (2), `<unk>` (3), then every
/// character of the text it was built from, in code-point order. Saved beside a model's checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct CharVocab {
    chars: Vec<char>,
    index: HashMap<char, u32>,
}

impl CharVocab {
    pub const PAD: u32 = 0;
    pub const SOS: u32 = 1;
    pub const EOS: u32 = 2;
    pub const UNK: u32 = 3;
    const SPECIALS: [&'static str; 4] = ["<pad>", "<sos>", "<eos>", "<unk>"];

    /// Every distinct character of `text`.
    pub fn from_text(text: &str) -> CharVocab {
        let chars: Vec<char> = text.chars().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        CharVocab::from_chars(chars)
    }

    fn from_chars(chars: Vec<char>) -> CharVocab {
        let index = chars.iter().enumerate().map(|(i, &c)| (c, i as u32 + Self::SPECIALS.len() as u32)).collect();
        CharVocab { chars, index }
    }

    /// Tokens, special ones included.
    pub fn len(&self) -> usize {
        Self::SPECIALS.len() + self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Token ids; a character not in the vocabulary becomes `<unk>`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.chars().map(|c| self.index.get(&c).copied().unwrap_or(Self::UNK)).collect()
    }

    /// Token ids, or an error naming the first character not in the vocabulary (a prompt to sample from).
    pub fn encode_strict(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| self.index.get(&c).copied().ok_or_else(|| DataError::Invalid(format!("character {c:?} (at {i}) is not in the vocabulary of {} characters", self.chars.len()))))
            .collect()
    }

    /// The text of token ids; special tokens are left out, ids beyond the vocabulary are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let specials = Self::SPECIALS.len() as u32;
        ids.iter()
            .filter(|&&i| i >= specials)
            .map(|&i| self.chars.get((i - specials) as usize).copied().ok_or_else(|| DataError::Invalid(format!("token {i} is beyond the vocabulary of {} tokens", self.len()))))
            .collect()
    }

    /// The vocabulary as JSON: `{"specials": [...], "chars": "..."}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "specials": Self::SPECIALS, "chars": self.chars.iter().collect::<String>() }).to_string()
    }

    /// Reads [`CharVocab::to_json`]'s form; `file` names it in errors.
    pub fn from_json(file: &str, json: &str) -> Result<CharVocab> {
        let bad = |problem: String| DataError::Corrupt { file: file.into(), problem };
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(format!("not a vocabulary: {e}")))?;
        if v["specials"] != serde_json::json!(Self::SPECIALS) {
            return Err(bad(format!("special tokens {} are not {:?}", v["specials"], Self::SPECIALS)));
        }
        let chars: Vec<char> = v["chars"].as_str().ok_or_else(|| bad("no \"chars\" string".into()))?.chars().collect();
        let distinct: std::collections::BTreeSet<&char> = chars.iter().collect();
        if distinct.len() != chars.len() {
            return Err(bad("a character appears twice".into()));
        }
        Ok(CharVocab::from_chars(chars))
    }

    /// Writes the JSON form atomically beside a checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e| DataError::Io { file: path.display().to_string(), source: e };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, self.to_json()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn load(path: &Path) -> Result<CharVocab> {
        let json = std::fs::read_to_string(path).map_err(|e| DataError::Io { file: path.display().to_string(), source: e })?;
        CharVocab::from_json(&path.display().to_string(), &json)
    }
}

/// Next-character prediction over encoded text: sample `i` is the window of `len` tokens starting at
/// `i * len`, and its targets the same window shifted by one (windows do not overlap; the last partial one is
/// left out).
pub struct CharWindows {
    tokens: Vec<u32>,
    len: usize,
}

impl CharWindows {
    pub fn new(tokens: Vec<u32>, len: usize) -> Result<CharWindows> {
        if len == 0 || tokens.len() < len + 1 {
            return Err(DataError::Invalid(format!("windows of {len} tokens need at least {} tokens, the text has {}", len + 1, tokens.len())));
        }
        Ok(CharWindows { tokens, len })
    }
}

impl Dataset for CharWindows {
    type Sample = Sequence;
    fn len(&self) -> usize {
        (self.tokens.len() - 1) / self.len
    }
    fn get(&self, i: usize) -> Result<Sequence> {
        if i >= Dataset::len(self) {
            return Err(DataError::Invalid(format!("window {i} of {}", Dataset::len(self))));
        }
        let at = i * self.len;
        Ok(Sequence { tokens: self.tokens[at..at + self.len].to_vec(), targets: Some(self.tokens[at + 1..at + self.len + 1].to_vec()) })
    }
}

/// Next-character windows for truncated backpropagation through time: the text cut into `streams`
/// contiguous streams, sample `i` being window `i / streams` of stream `i % streams`. Read in order in batches
/// of `streams`, batch k holds window k of every stream, so each row continues the row of the batch before and
/// a recurrent net's final state can start the next batch.
pub struct StreamWindows {
    tokens: Vec<u32>,
    streams: usize,
    len: usize,
    per_stream: usize,
}

impl StreamWindows {
    pub fn new(tokens: Vec<u32>, streams: usize, len: usize) -> Result<StreamWindows> {
        let stream_len = tokens.len().saturating_sub(1) / streams.max(1);
        if streams == 0 || len == 0 || stream_len < len {
            return Err(DataError::Invalid(format!("{streams} streams of windows of {len} tokens need at least {} tokens, the text has {}", streams * len + 1, tokens.len())));
        }
        Ok(StreamWindows { per_stream: stream_len / len, tokens, streams, len })
    }
    /// Windows per stream: the batches in an epoch.
    pub fn windows_per_stream(&self) -> usize {
        self.per_stream
    }
}

impl Dataset for StreamWindows {
    type Sample = Sequence;
    fn len(&self) -> usize {
        self.streams * self.per_stream
    }
    fn get(&self, i: usize) -> Result<Sequence> {
        if i >= Dataset::len(self) {
            return Err(DataError::Invalid(format!("window {i} of {}", Dataset::len(self))));
        }
        let (k, b) = (i / self.streams, i % self.streams);
        let at = b * (self.per_stream * self.len) + k * self.len;
        Ok(Sequence { tokens: self.tokens[at..at + self.len].to_vec(), targets: Some(self.tokens[at + 1..at + self.len + 1].to_vec()) })
    }
}

/// The text before its held-out tail, and the tail: the last `fraction` of the characters (a fixed split, as
/// language-model evaluations use).
pub fn split_tail(text: &str, fraction: f64) -> Result<(&str, &str)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(DataError::Invalid(format!("held-out fraction {fraction} must be in [0, 1)")));
    }
    let n = text.chars().count();
    let keep = n - (n as f64 * fraction).round() as usize;
    let at = text.char_indices().nth(keep).map(|(b, _)| b).unwrap_or(text.len());
    Ok(text.split_at(at))
}

/// Whole words as sequences for a generator: word w becomes tokens `<sos> w` and targets `w <eos>`, so the
/// model learns where words start and end. Batched with `PadSequences` (padding `<pad>`, which a loss with
/// `ignore_index` = `<pad>` leaves out).
pub struct WordSequences {
    words: Vec<Vec<u32>>,
}

impl WordSequences {
    /// Each word encoded with `vocab` (characters outside it become `<unk>`). An empty word is an error.
    pub fn new(words: &[String], vocab: &CharVocab) -> Result<WordSequences> {
        if let Some(i) = words.iter().position(|w| w.is_empty()) {
            return Err(DataError::Invalid(format!("word {i} is empty")));
        }
        Ok(WordSequences { words: words.iter().map(|w| vocab.encode(w)).collect() })
    }
}

impl Dataset for WordSequences {
    type Sample = Sequence;
    fn len(&self) -> usize {
        self.words.len()
    }
    fn get(&self, i: usize) -> Result<Sequence> {
        let w = self.words.get(i).ok_or_else(|| DataError::Invalid(format!("word {i} of {}", self.words.len())))?;
        let tokens = std::iter::once(CharVocab::SOS).chain(w.iter().copied()).collect();
        let targets = w.iter().copied().chain(std::iter::once(CharVocab::EOS)).collect();
        Ok(Sequence { tokens, targets: Some(targets) })
    }
}

/// Distinct words (first occurrence kept) split by a seeded shuffle into (train, held out), the held-out share
/// `fraction`: no word is in both.
pub fn split_words(words: &[String], fraction: f64, seed: u64) -> Result<(Vec<String>, Vec<String>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(DataError::Invalid(format!("held-out fraction {fraction} must be in [0, 1)")));
    }
    let mut seen = std::collections::HashSet::new();
    let mut distinct: Vec<String> = words.iter().filter(|w| seen.insert(w.as_str())).cloned().collect();
    // Fisher-Yates with a SplitMix64 stream: the split depends on the seed alone.
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..distinct.len()).rev() {
        distinct.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let held = (distinct.len() as f64 * fraction).round() as usize;
    let train = distinct.split_off(held);
    Ok((train, distinct))
}
