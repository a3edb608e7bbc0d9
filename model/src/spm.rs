//! SentencePiece tokenization from GGUF metadata (`tokenizer.ggml.model = "llama"`: Gemma, Phi-3,
//! Llama 2), as llama.cpp does it (`llm_tokenizer_spm`): special tokens are split out of the text
//! first, spaces become `▁`, then adjacent pieces merge, highest-scoring result first, and what
//! forms no token falls back to byte tokens (`<0xXX>`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF token types (`tokenizer.ggml.token_type`).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const BYTE: i64 = 6;

/// The whitespace escape of SentencePiece vocabularies.
const SPACE: &str = "\u{2581}";

/// A SentencePiece vocabulary with scores.
#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i64>,
    by_text: HashMap<String, u32>,
    /// The token of each byte, for pieces that form no token.
    bytes: Vec<Option<u32>>,
    /// Control, user-defined and unknown tokens, longest text first: matched whole in the text
    /// before anything else (llama.cpp's `tokenizer_st_partition` with special tokens parsed).
    specials: Vec<u32>,
    /// Prefix a space to text that starts the input or follows a special token.
    add_space_prefix: bool,
    unknown: Option<u32>,
}

/// A part of the text being tokenized: raw text (a byte range), or a special token already found.
#[derive(Debug, Clone, Copy)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

impl SpmTokenizer {
    /// A vocabulary of `tokens` with their `scores` and `types` (all three of one length).
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i64>,
        add_space_prefix: bool,
        unknown: Option<u32>,
    ) -> Result<Self, String> {
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(format!(
                "{} tokens, {} scores and {} types",
                tokens.len(),
                scores.len(),
                types.len()
            ));
        }
        let mut by_text = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            by_text.entry(t.clone()).or_insert(id as u32);
        }
        let bytes = (0..=255u8)
            .map(|b| {
                by_text
                    .get(&format!("<0x{b:02X}>"))
                    .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| by_text.get(s)))
                    .copied()
            })
            .collect();
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&id| {
                matches!(types[id as usize], CONTROL | USER_DEFINED | UNKNOWN)
                    && !tokens[id as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));
        Ok(Self {
            tokens,
            scores,
            types,
            by_text,
            bytes,
            specials,
            add_space_prefix,
            unknown,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token's exact text.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    /// The ids of `text` (no BOS; the caller adds it).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with_data(text, &[])
    }

    /// [`SpmTokenizer::encode`], with control and unknown tokens not matched where they overlap
    /// the byte ranges `data` (llama.cpp's `parse_special = false` there; user-defined tokens
    /// still are).
    pub fn encode_with_data(&self, text: &str, data: &[std::ops::Range<usize>]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text, data) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(start, end) => {
                    let mut piece = String::new();
                    if self.add_space_prefix && prev_special {
                        piece.push(' ');
                    }
                    piece.push_str(&text[start..end]);
                    self.tokenize_piece(&piece.replace(' ', SPACE), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// The text of `ids`, special tokens included as their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(text) = self.tokens.get(id as usize) else {
                continue;
            };
            match self.types[id as usize] {
                NORMAL => bytes.extend_from_slice(text.replace(SPACE, " ").as_bytes()),
                BYTE => bytes.extend(byte_of(text)),
                CONTROL | USER_DEFINED | UNKNOWN => bytes.extend_from_slice(text.as_bytes()),
                // Unused tokens render as nothing, as in llama.cpp.
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Every id's bytes (see `TextTokenizer::token_bytes`): normal pieces with `▁` as a space, byte
    /// tokens as their byte, control and unknown tokens marked, unused ones empty.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        self.tokens
            .iter()
            .zip(&self.types)
            .map(|(text, &kind)| match kind {
                NORMAL => text.replace(SPACE, " ").into_bytes(),
                BYTE => byte_of(text).into_iter().collect(),
                USER_DEFINED => text.as_bytes().to_vec(),
                CONTROL | UNKNOWN => crate::tokenizer::control_bytes(text),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The control tokens' texts and ids.
    pub fn control_tokens(&self) -> Vec<(String, u32)> {
        self.specials
            .iter()
            .filter(|&&id| matches!(self.types[id as usize], CONTROL | UNKNOWN))
            .map(|&id| (self.tokens[id as usize].clone(), id))
            .collect()
    }

    /// Splits special tokens out of `text`, longest first, as llama.cpp does; control and unknown
    /// tokens overlapping `data` stay text.
    fn partition(&self, text: &str, data: &[std::ops::Range<usize>]) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0, text.len())];
        for &id in &self.specials {
            let special = self.tokens[id as usize].as_str();
            if !text.contains(special) {
                continue;
            }
            let parse_here = |at: usize| {
                !matches!(self.types[id as usize], CONTROL | UNKNOWN)
                    || !data
                        .iter()
                        .any(|r| r.start < at + special.len() && at < r.end)
            };
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut search = start;
                while let Some(found) = text[search..end].find(special) {
                    let at = search + found;
                    if !parse_here(at) {
                        search = at + special.chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if at > start {
                        next.push(Fragment::Text(start, at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + special.len();
                    search = start;
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The merge loop of one escaped piece of raw text.
    fn tokenize_piece(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols are byte ranges of `text`, linked as a list so merges are O(1).
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            let len = ch.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.try_bigram(text, &symbols, i - 1, i, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (bigram.left, bigram.right);
            // A side already merged elsewhere makes the candidate stale.
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != bigram.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            if let Some(p) = symbols[l].prev {
                self.try_bigram(text, &symbols, p, l, &mut queue);
            }
            if let Some(n) = symbols[l].next {
                self.try_bigram(text, &symbols, l, n, &mut queue);
            }
        }
        // Every merge formed a token, so a symbol is a token or a single character that is none
        // (which goes out as its bytes; llama.cpp's re-segmentation of merges never triggers).
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let piece = &text[symbols[i].start..symbols[i].start + symbols[i].len];
            match self.by_text.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.bytes[b as usize].or(self.unknown)),
                ),
            }
            at = symbols[i].next;
        }
    }

    fn try_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (start, size) = (symbols[left].start, symbols[left].len + symbols[right].len);
        if let Some(&id) = self.by_text.get(&text[start..start + size]) {
            queue.push(Bigram {
                left,
                right,
                score: self.scores[id as usize],
                size,
            });
        }
    }
}

#[derive(Debug, Clone)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; the heap pops the highest score first, and of equal scores the leftmost.
#[derive(Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// The byte of a `<0xXX>` token.
pub(crate) fn byte_of(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary where merge order matters: "▁ab" scores above "▁a" + "b", "bc" above both, so
    /// "▁abc" becomes "▁a" "bc" (the best-scoring pair merges first), a character outside the
    /// vocabulary falls back to bytes, and a control token is split out whole.
    fn vocab() -> SpmTokenizer {
        let mut tokens: Vec<String> = [
            "<unk>",
            "<s>",
            "</s>",
            "\u{2581}",
            "a",
            "b",
            "c",
            "\u{2581}a",
            "bc",
            "\u{2581}ab",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut scores = vec![0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -3.0, -0.5, -1.5];
        let mut types = vec![
            UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL,
        ];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(BYTE);
        }
        SpmTokenizer::new(tokens, scores, types, true, Some(0)).unwrap()
    }

    #[test]
    fn merges_by_score_with_byte_fallback_and_specials() {
        let t = vocab();
        let id = |s: &str| t.token_to_id(s).unwrap();
        // Space prefix added: "▁abc" -> bc (-0.5) merges first, then "▁" + "a" (-3) -> "▁a".
        assert_eq!(t.encode("abc"), vec![id("\u{2581}a"), id("bc")]);
        // "é" is not in the vocabulary: its two UTF-8 bytes.
        assert_eq!(
            t.encode("aé"),
            vec![id("\u{2581}a"), id("<0xC3>"), id("<0xA9>")]
        );
        // The control token is matched whole; the text after it gets the space prefix again.
        assert_eq!(
            t.encode("a</s>b"),
            vec![id("\u{2581}a"), id("</s>"), id("\u{2581}"), id("b")]
        );
        assert_eq!(t.decode(&t.encode("abc aé")), " abc aé");
        assert_eq!(t.encode(""), Vec::<u32>::new());
    }
}
