//! Turning a growing list of token ids into text deltas that are always whole characters, and
//! stopping at stop strings without ever streaming a part of one.

use strata_model::{ModelError, TextTokenizer};

/// Incremental decoding in the manner of text-generation-inference: decode a window that starts a few
/// tokens back (so tokenizers that drop a leading space at the start of a decode still render it), and
/// emit only when the new text does not end inside a multi-byte character (U+FFFD).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(text[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back at the end of generation (an incomplete character, rendered as
    /// U+FFFD, as a full decode would).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, ModelError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Holds back text that could be the start of a stop string, and finds stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What the matcher allows out after some text arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text that is safe to stream now (possibly empty).
    Continue(String),
    /// A stop string appeared: the text before it that was not yet streamed; generation ends.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    pub fn push(&mut self, delta: &str) -> StopCheck {
        self.text.push_str(delta);
        // A stop string may begin in text held back, never in text already streamed: any streamed
        // suffix that could start a stop string was held back instead.
        let search_from = self.emitted;
        let found = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = found {
            let out = self.text[self.emitted..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return StopCheck::Stopped(out);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_that_prefixes(&self.text, s))
            .max()
            .unwrap_or(0);
        let safe = floor_char_boundary(&self.text, self.text.len() - hold).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        StopCheck::Continue(out)
    }

    /// Releases text held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

fn longest_suffix_that_prefixes(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop
                    .as_bytes()
                    .starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_never_streamed() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(m.push("Hello"), StopCheck::Continue("Hello".into()));
        assert_eq!(m.push(" world\n"), StopCheck::Continue(" world".into()));
        assert_eq!(m.push("\nUs"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("er: hi"), StopCheck::Stopped(String::new()));
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the EN"), StopCheck::Continue("the ".into()));
        assert_eq!(m.push("D?"), StopCheck::Stopped(String::new()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the EN"), StopCheck::Continue("the ".into()));
        assert_eq!(m.push("ding"), StopCheck::Continue("ENding".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_inside_one_delta_cuts_there() {
        let mut m = StopMatcher::new(vec![".".into()]);
        assert_eq!(m.push("Paris. Then"), StopCheck::Stopped("Paris".into()));
    }

    #[test]
    fn no_stops_streams_everything() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("é🚀"), StopCheck::Continue("é🚀".into()));
    }
}
