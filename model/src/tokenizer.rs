//! The text tokenizer of a model and its end-of-generation tokens.
//!
//! For GGUF files the tokenizer is rebuilt from the file's own metadata the way llama.cpp reads it
//! (`tokenizer.ggml.*`): byte-level BPE with the merges in the file and the pre-tokenizer named by
//! `tokenizer.ggml.pre` (`gpt2` files), or SentencePiece with the file's scores (`llama` files,
//! `spm.rs`); control tokens as special tokens, and a BOS only if `add_bos_token` says so.
//! For Hugging Face directories `tokenizer.json` is used as it is.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::spm::SpmTokenizer;
use crate::{ModelError, ModelFile, ModelFormat};

/// Texts of tokens that end a turn in the chat formats of common models. llama.cpp treats a control
/// token with one of these texts as end-of-generation even if the file names another EOS
/// (`llama-vocab.cpp`, "special_eog_ids"); strata does the same so both stop at the same place.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// The most bytes [`TextTokenizer::encode`] hands a byte-level BPE tokenizer at once.
const PIECE_BYTES: usize = 64 << 10;

/// `text` cut into pieces of at most [`PIECE_BYTES`], each cut where every byte-level pre-tokenizer
/// here (GPT-2's, Llama 3's, Qwen2's, with or without single digits) ends a pre-token anyway, so the
/// ids are those of the whole text: after a line break that a non-space follows, or before a space
/// between two letters. Only a stretch of that length with neither (one character repeated, say)
/// is cut where it must, at a character boundary.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= PIECE_BYTES {
            return Some(std::mem::take(&mut rest));
        }
        let window = &rest.as_bytes()[..PIECE_BYTES];
        let letter = |b: u8| b.is_ascii_alphabetic();
        let cut = (PIECE_BYTES / 2..PIECE_BYTES - 1)
            .rev()
            .find(|&i| {
                (window[i - 1] == b'\n' && !window[i].is_ascii_whitespace())
                    || (window[i] == b' ' && letter(window[i - 1]) && letter(window[i + 1]))
            })
            .unwrap_or_else(|| {
                (1..=PIECE_BYTES)
                    .rev()
                    .find(|&i| rest.is_char_boundary(i))
                    .unwrap_or(rest.len())
            });
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Where control tokens stand in `text` outside the `data` ranges, in order, as (byte offset,
/// length, id): longest token first wherever two could start at one place.
fn control_matches(
    text: &str,
    controls: &[(String, u32)],
    data: &[Range<usize>],
) -> Vec<(usize, usize, u32)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        let hit = controls.iter().find(|(special, _)| {
            rest.starts_with(special.as_str())
                && !data
                    .iter()
                    .any(|r| r.start < at + special.len() && at < r.end)
        });
        match hit {
            Some((special, id)) => {
                found.push((at, special.len(), *id));
                at += special.len();
            }
            None => at += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    found
}

/// The Llama 3 pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`): numbers in groups of
/// up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`): Llama 3's, with digits
/// one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer: text to ids and back, plus which ids end generation.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Backend,
    /// Prepended by `encode` (GGUF files with `add_bos_token`); HF tokenizers add their own.
    bos_to_prepend: Option<u32>,
    /// Whether `encode` asks the HF post-processor to add special tokens.
    post_process: bool,
    end_of_generation: BTreeSet<u32>,
    /// The HF tokenizer with special tokens read as plain text, made the first time a request
    /// has control-token text in its data (`encode_with_data`).
    hf_as_text: OnceLock<Tokenizer>,
    /// [`TextTokenizer::control_tokens`], listed once.
    controls: OnceLock<Vec<(String, u32)>>,
}

/// The tokenization algorithm.
#[derive(Clone)]
enum Backend {
    /// Hugging Face `tokenizers`: `tokenizer.json`, or byte-level BPE rebuilt from GGUF.
    Hf(Box<Tokenizer>),
    /// SentencePiece from GGUF scores.
    Spm(Box<SpmTokenizer>),
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("end_of_generation", &self.end_of_generation)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads the tokenizer of a model file.
    pub fn load(model: &ModelFile) -> Result<Self, ModelError> {
        match model.format {
            ModelFormat::Gguf => Self::from_gguf(&model.path, &model.gguf_content()?),
            ModelFormat::Safetensors => Self::from_hf_dir(&model.path),
        }
    }

    /// Encodes text as a prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        ids.extend(self.bos_to_prepend);
        match &self.inner {
            // Long texts go through in pieces cut where the pre-tokenizer cuts anyway, keeping
            // only ids: a 1 MiB prompt as one encoding held ~90 MiB (a token string and offsets
            // per token, and BPE's merge state for a 1 MiB word).
            Backend::Hf(inner) if !self.post_process && text.len() > PIECE_BYTES => {
                for piece in pieces(text) {
                    let encoding = inner
                        .encode(piece, false)
                        .map_err(|e| tokenizer_error(Path::new("<text>"), e))?;
                    ids.extend_from_slice(encoding.get_ids());
                }
            }
            Backend::Hf(inner) => {
                let encoding = inner
                    .encode(text, self.post_process)
                    .map_err(|e| tokenizer_error(Path::new("<text>"), e))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Backend::Spm(spm) => ids.extend(spm.encode(text)),
        }
        Ok(ids)
    }

    /// Encodes a raw prompt: with `parse_special`, control-token text in it is read as those
    /// tokens, as [`TextTokenizer::encode`] does; without, it is all text the user typed
    /// (llama.cpp's `parse_special = false`), so `<|im_start|>` in it is characters.
    pub fn encode_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, ModelError> {
        if parse_special {
            self.encode(text)
        } else {
            let whole = 0..text.len();
            self.encode_with_data(text, std::slice::from_ref(&whole))
        }
    }

    /// Encodes a prompt in which the byte ranges `data` (chat messages' content) are text the
    /// user typed: a control token's text there (`<|im_start|>`) is tokenized as the characters it
    /// is, never as the control token, so content cannot open a turn of its own (llama.cpp's
    /// `parse_special = false` for those ranges). Everywhere else, as [`TextTokenizer::encode`];
    /// with no control-token text in `data`, exactly it.
    pub fn encode_with_data(
        &self,
        text: &str,
        data: &[Range<usize>],
    ) -> Result<Vec<u32>, ModelError> {
        let controls = self.control_tokens();
        // Only a control token that would be read where data lies changes anything.
        let overlaps = |&(at, len, _): &(usize, usize, u32)| {
            data.iter().any(|r| r.start < at + len && at < r.end)
        };
        if !control_matches(text, controls, &[]).iter().any(overlaps) {
            return self.encode(text);
        }
        let mut ids = Vec::new();
        ids.extend(self.bos_to_prepend);
        match &self.inner {
            Backend::Spm(spm) => ids.extend(spm.encode_with_data(text, data)),
            Backend::Hf(inner) => {
                let as_text = self.hf_as_text.get_or_init(|| {
                    let mut plain = (**inner).clone();
                    plain.set_encode_special_tokens(true);
                    plain
                });
                let encode = |piece: &str, add_special: bool| {
                    as_text
                        .encode(piece, add_special)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| tokenizer_error(Path::new("<text>"), e))
                };
                // What the post-processor adds around a whole prompt (a BOS) comes once.
                ids.extend(encode("", self.post_process)?);
                let mut start = 0;
                for (at, len, id) in control_matches(text, controls, data) {
                    if at > start {
                        ids.extend(encode(&text[start..at], false)?);
                    }
                    ids.push(id);
                    start = at + len;
                }
                if start < text.len() {
                    ids.extend(encode(&text[start..], false)?);
                }
            }
        }
        Ok(ids)
    }

    /// The control tokens' texts.
    pub fn control_texts(&self) -> impl Iterator<Item = &str> {
        self.control_tokens().iter().map(|(t, _)| t.as_str())
    }

    /// The control tokens' texts and ids, longest first.
    fn control_tokens(&self) -> &[(String, u32)] {
        self.controls.get_or_init(|| self.list_control_tokens())
    }

    fn list_control_tokens(&self) -> Vec<(String, u32)> {
        let mut controls: Vec<(String, u32)> = match &self.inner {
            Backend::Hf(inner) => inner
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special && !t.content.is_empty())
                .map(|(id, t)| (t.content, id))
                .collect(),
            Backend::Spm(spm) => spm.control_tokens(),
        };
        controls.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        controls
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        match &self.inner {
            Backend::Hf(inner) => inner
                .decode(ids, false)
                .map_err(|e| tokenizer_error(Path::new("<ids>"), e)),
            Backend::Spm(spm) => Ok(spm.decode(ids)),
        }
    }

    /// Whether the model ends its output with this token.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The ids that end generation, ascending.
    pub fn end_of_generation_ids(&self) -> Vec<u32> {
        self.end_of_generation.iter().copied().collect()
    }

    /// Every id's bytes, as a grammar matches output text against them: control tokens as
    /// [`CONTROL_MARKER`] followed by their text (so no text rule ever matches one), byte tokens as
    /// their byte, and ids the tokenizer does not know as nothing.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        match &self.inner {
            Backend::Spm(spm) => spm.token_bytes(),
            Backend::Hf(inner) => {
                let byte_level = matches!(
                    inner.get_decoder(),
                    Some(tokenizers::DecoderWrapper::ByteLevel(_))
                );
                let unicode_to_byte = if byte_level {
                    byte_level_alphabet()
                } else {
                    HashMap::new()
                };
                let added = inner.get_added_tokens_decoder();
                (0..inner.get_vocab_size(true) as u32)
                    .map(|id| {
                        if let Some(token) = added.get(&id) {
                            return if token.special {
                                control_bytes(&token.content)
                            } else {
                                token.content.as_bytes().to_vec()
                            };
                        }
                        let Some(piece) = inner.id_to_token(id) else {
                            return Vec::new();
                        };
                        if let Some(byte) = crate::spm::byte_of(&piece) {
                            return vec![byte];
                        }
                        if byte_level {
                            let mapped: Option<Vec<u8>> = piece
                                .chars()
                                .map(|c| unicode_to_byte.get(&c).copied())
                                .collect();
                            if let Some(bytes) = mapped {
                                return bytes;
                            }
                        }
                        piece.replace('\u{2581}', " ").into_bytes()
                    })
                    .collect()
            }
        }
    }

    /// The number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Hf(inner) => inner.get_vocab_size(true),
            Backend::Spm(spm) => spm.vocab_size(),
        }
    }

    /// Builds the tokenizer from GGUF metadata, as llama.cpp does.
    pub fn from_gguf(path: &Path, content: &Content) -> Result<Self, ModelError> {
        let md = &content.metadata;
        let string = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
        let kind = string("tokenizer.ggml.model")
            .ok_or_else(|| ModelError::invalid(path, "missing tokenizer.ggml.model"))?;
        if kind != "gpt2" && kind != "llama" {
            return Err(ModelError::unsupported(
                path,
                format!(
                    "tokenizer.ggml.model {kind:?}: strata builds byte-level BPE (\"gpt2\") and \
                     SentencePiece (\"llama\") tokenizers from GGUF"
                ),
            ));
        }
        let tokens = string_array(md, "tokenizer.ggml.tokens")
            .ok_or_else(|| ModelError::invalid(path, "missing tokenizer.ggml.tokens"))?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(values)) => values.iter().map(value_i64).collect(),
            _ => vec![1; tokens.len()],
        };
        let inner = if kind == "llama" {
            let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                Some(Value::Array(values)) => {
                    values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect()
                }
                _ => return Err(ModelError::invalid(path, "missing tokenizer.ggml.scores")),
            };
            let add_space_prefix = md
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
            let unknown = md
                .get("tokenizer.ggml.unknown_token_id")
                .map(value_i64)
                .and_then(|v| u32::try_from(v).ok());
            let spm = SpmTokenizer::new(
                tokens.iter().map(|t| (*t).clone()).collect(),
                scores,
                types.clone(),
                add_space_prefix,
                unknown,
            )
            .map_err(|e| tokenizer_error(path, e))?;
            Backend::Spm(Box::new(spm))
        } else {
            Backend::Hf(Box::new(bpe_from_gguf(path, md, &tokens, &types)?))
        };
        let id_of = |key: &str| {
            md.get(key)
                .map(value_i64)
                .and_then(|v| u32::try_from(v).ok())
        };
        // llama.cpp's default when the key is absent: SentencePiece vocabularies add a BOS.
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(kind == "llama");
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let mut end_of_generation: BTreeSet<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id_of(k))
        .collect();
        for (id, (text, t)) in tokens.iter().zip(&types).enumerate() {
            if (*t == 3 || *t == 4) && END_OF_GENERATION_TEXTS.contains(&text.as_str()) {
                end_of_generation.insert(id as u32);
            }
        }
        Ok(Self {
            inner,
            bos_to_prepend: if add_bos { bos } else { None },
            post_process: false,
            end_of_generation,
            hf_as_text: OnceLock::new(),
            controls: OnceLock::new(),
        })
    }

    /// Loads `tokenizer.json` from a Hugging Face directory; end-of-generation ids come from
    /// `config.json` and `generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let (inner, end_of_generation) = Self::hf_parts(dir)?;
        Ok(Self {
            inner: Backend::Hf(Box::new(inner)),
            bos_to_prepend: None,
            post_process: true,
            end_of_generation,
            hf_as_text: OnceLock::new(),
            controls: OnceLock::new(),
        })
    }

    fn hf_parts(dir: &Path) -> Result<(Tokenizer, BTreeSet<u32>), ModelError> {
        let file = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&file).map_err(|e| tokenizer_error(&file, e))?;
        let mut end_of_generation = BTreeSet::new();
        for name in ["config.json", "generation_config.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                continue;
            };
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::invalid(&dir.join(name), e.to_string()))?;
            match &json["eos_token_id"] {
                serde_json::Value::Number(n) => {
                    end_of_generation.extend(n.as_u64().map(|v| v as u32))
                }
                serde_json::Value::Array(list) => end_of_generation
                    .extend(list.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
                _ => {}
            }
        }
        for text in END_OF_GENERATION_TEXTS {
            if let Some(id) = inner
                .get_added_vocabulary()
                .token_to_id(text, inner.get_model())
            {
                end_of_generation.insert(id);
            }
        }
        Ok((inner, end_of_generation))
    }
}

/// Byte-level BPE from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
fn bpe_from_gguf(
    path: &Path,
    md: &HashMap<String, Value>,
    tokens: &[&String],
    types: &[i64],
) -> Result<Tokenizer, ModelError> {
    let string = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
    let merges = string_array(md, "tokenizer.ggml.merges")
        .ok_or_else(|| ModelError::invalid(path, "missing tokenizer.ggml.merges"))?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| ((*t).clone(), id as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            // llama.cpp splits at the first space after the first byte: tokens never hold a space
            // (byte-level BPE maps it to 'Ġ') but a merge's first part could start with one.
            let at = m
                .char_indices()
                .skip(1)
                .find(|(_, c)| *c == ' ')
                .map(|(i, _)| i);
            match at {
                Some(i) => Ok((m[..i].to_string(), m[i + 1..].to_string())),
                None => Err(ModelError::invalid(
                    path,
                    format!("merge {m:?} has no space"),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tokenizer_error(path, e))?;
    let mut inner = Tokenizer::new(bpe);
    let pre = string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    inner.with_pre_tokenizer(Some(pre_tokenizer(path, &pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));

    // Control (3) and user-defined (4) tokens are matched whole in the text, like llama.cpp with
    // special-token parsing on; control tokens are "special".
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(text, t)| AddedToken::from((*text).clone(), *t == 3))
        .collect();
    inner.add_special_tokens(&added);
    Ok(inner)
}

fn pre_tokenizer(path: &Path, pre: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let byte_level = ByteLevel::new(false, false, true);
    let wrapper: PreTokenizerWrapper = match pre {
        // GPT-2's split (ByteLevel's own regex).
        "default" | "gpt2" | "gpt-2" | "phi-2" => byte_level.into(),
        // Digits one by one, then GPT-2's split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_SMOLLM` and kin).
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => regex_then_bytes(path, LLAMA3_SPLIT)?,
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => regex_then_bytes(path, QWEN2_SPLIT)?,
        other => {
            return Err(ModelError::unsupported(
                path,
                format!("tokenizer.ggml.pre {other:?} is not implemented"),
            ))
        }
    };
    Ok(wrapper)
}

/// A regex split (matches kept as pieces) followed by the byte-level mapping without GPT-2's own
/// split.
fn regex_then_bytes(path: &Path, pattern: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let split = Split::new(
        SplitPattern::Regex(pattern.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tokenizer_error(path, e))?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])
    .into())
}

fn string_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<Vec<&'a String>> {
    match md.get(key)? {
        Value::Array(values) => values.iter().map(|v| v.to_string().ok()).collect(),
        _ => None,
    }
}

fn value_i64(v: &Value) -> i64 {
    match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        _ => -1,
    }
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// What [`TextTokenizer::token_bytes`] puts before a control token's text: a byte no UTF-8 text
/// holds (llguidance's `TokTrie::SPECIAL_TOKEN_MARKER`).
pub const CONTROL_MARKER: u8 = 0xff;

pub(crate) fn control_bytes(text: &str) -> Vec<u8> {
    let mut bytes = vec![CONTROL_MARKER];
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

/// GPT-2's byte-level alphabet (`bytes_to_unicode`), inverted: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes are written as U+0100 and up, in byte order.
fn byte_level_alphabet() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("U+0100..U+0143 are characters")
            };
            (c, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default model as `strata fetch-model` caches it (CI fetches it before the tests).
    fn smollm2() -> TextTokenizer {
        let home = std::env::var_os("STRATA_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/strata")
            });
        let path = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let model = ModelFile::open(&path)
            .unwrap_or_else(|e| panic!("{e} (run `strata fetch-model` first)"));
        TextTokenizer::load(&model).unwrap()
    }

    #[test]
    fn token_bytes_spell_what_decoding_spells() {
        let tokenizer = smollm2();
        let bytes = tokenizer.token_bytes();
        assert_eq!(bytes.len(), tokenizer.vocab_size());
        // A sentence's tokens, byte strings joined, are the sentence; a control token is marked.
        let text = "Le café coûte 3,50 € — it's\n 12:30!";
        let ids = tokenizer.encode(text).unwrap();
        let joined: Vec<u8> = ids
            .iter()
            .flat_map(|&id| bytes[id as usize].clone())
            .collect();
        assert_eq!(String::from_utf8(joined).unwrap(), text);
        let end = tokenizer.end_of_generation_ids()[0];
        assert_eq!(bytes[end as usize][0], CONTROL_MARKER);
        assert_eq!(
            &bytes[end as usize][1..],
            tokenizer.decode(&[end]).unwrap().as_bytes()
        );
        // Every token that decodes to whole characters is spelled as those characters; the
        // others are parts of a character (byte-level BPE splits them).
        let mut partial = 0;
        for (id, spelled) in bytes.iter().enumerate() {
            let decoded = tokenizer.decode(&[id as u32]).unwrap();
            if spelled.first() == Some(&CONTROL_MARKER) {
                assert_eq!(&spelled[1..], decoded.as_bytes());
            } else if std::str::from_utf8(spelled).is_err() {
                assert!(decoded.contains('\u{FFFD}'), "token {id}");
                partial += 1;
            } else {
                assert_eq!(spelled, decoded.as_bytes(), "token {id}");
            }
        }
        assert!(
            partial > 0,
            "byte-level BPE has tokens that end inside a character"
        );
    }

    #[test]
    fn long_texts_tokenize_in_pieces_exactly_as_in_one() {
        let tokenizer = smollm2();
        let Backend::Hf(inner) = &tokenizer.inner else {
            panic!("SmolLM2 has a byte-level BPE tokenizer");
        };
        let whole = |text: &str| inner.encode(text, false).unwrap().get_ids().to_vec();
        let line = "Le café coûte 3,50 € — it's 12:30!\tOK?  Ja, 2024-05-06;  x\n\n  indented";
        let prose = "word ".repeat(40_000);
        let mut mixed = String::new();
        while mixed.len() < 300_000 {
            mixed.push_str(line);
            mixed.push('\n');
        }
        for text in [mixed.as_str(), prose.as_str()] {
            assert!(text.len() > 2 * PIECE_BYTES);
            assert!(pieces(text).all(|p| p.len() <= PIECE_BYTES));
            assert_eq!(pieces(text).collect::<String>(), text);
            assert_eq!(tokenizer.encode(text).unwrap(), whole(text));
        }
        // A run with no place to cut is cut anyway, and loses nothing.
        let run = "a".repeat(200_000);
        let ids = tokenizer.encode(&run).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), run);
    }
}
