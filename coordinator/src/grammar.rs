//! Constrained decoding: a grammar (a JSON Schema, or llguidance's Lark dialect) compiled against
//! the model's vocabulary, and per sequence the mask of tokens it allows next. The coordinator owns
//! the grammar state, since it knows the tokens; the last stage only applies the mask it is sent.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use strata_model::TextTokenizer;

/// What the output must follow.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    JsonSchema(serde_json::Value),
    Lark(String),
}

/// The vocabulary as llguidance sees it, built once (the first constrained request pays for it).
pub struct Grammars {
    factory: ParserFactory,
    /// Every end-of-generation token: the grammar's one EOS stands for all of them.
    end_of_generation: Arc<[u32]>,
    words: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("words", &self.words)
            .finish()
    }
}

impl Grammars {
    /// The grammar side of `tokenizer`, over a vocabulary of `vocab_size` ids (the model's, which
    /// may be larger than the tokenizer's: the ids past it are never allowed).
    pub fn new(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<Self, String> {
        let mut words = tokenizer.token_bytes();
        words.resize(vocab_size.max(words.len()), Vec::new());
        let end_of_generation: Arc<[u32]> = tokenizer.end_of_generation_ids().into();
        let Some(&eos) = end_of_generation.first() else {
            return Err("the model names no end-of-generation token".into());
        };
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&end_of_generation);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory,
            end_of_generation,
            words: vocab_size.div_ceil(32),
        })
    }

    /// Compiles `spec` for one sequence; a grammar that does not compile says why.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint {
            matcher,
            pending: Vec::new(),
            end_of_generation: self.end_of_generation.clone(),
            words: self.words,
            failed: None,
        })
    }

    /// Whether `value` is valid under `schema` as this crate's grammars read JSON (the model's
    /// output under that schema could have been exactly it).
    pub fn fits(&self, schema: &serde_json::Value, value: &serde_json::Value) -> bool {
        let Ok(mut c) = self.compile(&GrammarSpec::JsonSchema(schema.clone())) else {
            return false;
        };
        let Ok(env) = c.matcher.tok_env() else {
            return false;
        };
        let tokens = env.tokenize_bytes(value.to_string().as_bytes());
        c.matcher
            .try_consume_tokens(&tokens)
            .is_ok_and(|n| n == tokens.len())
            && c.matcher.is_accepting().unwrap_or(false)
    }
}

/// One sequence's grammar state: the tokens sampled since the last mask are taken in when the next
/// mask is computed, off the scheduler's task.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    pending: Vec<u32>,
    end_of_generation: Arc<[u32]>,
    words: usize,
    /// Why the grammar failed, once it has: the output ends there, as an error, not a success.
    failed: Option<String>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("pending", &self.pending)
            .finish()
    }
}

impl Constraint {
    /// A token the sequence generated (one its last mask allowed).
    pub fn accept(&mut self, token: u32) {
        self.pending.push(token);
    }

    /// Why the grammar failed, if it has (see [`Constraint::next_mask`]).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The tokens allowed next, as the wire's bitmask (one bit per vocabulary id). Once the grammar
    /// is complete only end-of-generation tokens are. A grammar that fails (llguidance out of lexer
    /// fuel, or an error of its own) allows only them too, so the output ends where it went wrong,
    /// and records why: the request then ends with an error, not as a finished output.
    pub fn next_mask(&mut self) -> Vec<u32> {
        let pending = std::mem::take(&mut self.pending);
        let mask = self
            .matcher
            .consume_tokens(&pending)
            .and_then(|()| self.matcher.compute_mask_or_eos());
        let mut words = vec![0u32; self.words];
        match mask {
            Ok(mask) => {
                for (w, m) in words.iter_mut().zip(mask.as_slice()) {
                    *w = *m;
                }
                if self.end_of_generation.iter().any(|&t| mask.is_allowed(t)) {
                    self.allow_end(&mut words);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the grammar failed: ending the output");
                self.failed.get_or_insert_with(|| e.to_string());
                self.allow_end(&mut words);
            }
        }
        if words.iter().all(|&w| w == 0) {
            self.allow_end(&mut words);
        }
        words
    }

    fn allow_end(&self, words: &mut [u32]) {
        for &t in self.end_of_generation.iter() {
            if let Some(w) = words.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scheduler::tests::smollm2;

    fn allowed(mask: &[u32]) -> Vec<u32> {
        (0..mask.len() as u32 * 32)
            .filter(|&t| mask[t as usize / 32] >> (t % 32) & 1 == 1)
            .collect()
    }

    /// Walks the grammar greedily by the lowest allowed id that keeps `target` a prefix of the
    /// text, as a model that wants `target` would: every step's mask must allow such a token.
    fn spell(tokenizer: &TextTokenizer, constraint: &mut Constraint, target: &str) -> String {
        let bytes = tokenizer.token_bytes();
        let mut text = String::new();
        while text.len() < target.len() {
            let mask = constraint.next_mask();
            let next = allowed(&mask)
                .into_iter()
                .filter(|&t| !bytes[t as usize].is_empty())
                .filter(|&t| {
                    let piece = String::from_utf8_lossy(&bytes[t as usize]);
                    target[text.len()..].starts_with(piece.as_ref())
                })
                .max_by_key(|&t| bytes[t as usize].len())
                .unwrap_or_else(|| panic!("no allowed token continues {text:?} to {target:?}"));
            text.push_str(&String::from_utf8_lossy(&bytes[next as usize]));
            constraint.accept(next);
        }
        text
    }

    #[test]
    fn a_schema_allows_its_json_and_then_only_the_end() {
        let tokenizer = smollm2();
        let grammars = Grammars::new(&tokenizer, 49152).unwrap();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": false,
        });
        let mut c = grammars.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
        let first = allowed(&c.next_mask());
        // The first token opens the object: `{` alone or with what follows it, never a letter.
        let bytes = tokenizer.token_bytes();
        assert!(
            first
                .iter()
                .all(|&t| bytes[t as usize].first() == Some(&b'{')),
            "{first:?}"
        );
        let text = spell(&tokenizer, &mut c, r#"{"city":"Paris","days":3}"#);
        assert_eq!(text, r#"{"city":"Paris","days":3}"#);
        assert_eq!(allowed(&c.next_mask()), tokenizer.end_of_generation_ids());
        // A second sequence compiles its own state.
        let mut other = grammars
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "object"}),
            ))
            .unwrap();
        assert!(!allowed(&other.next_mask()).contains(&(b'x' as u32)));
    }

    #[test]
    fn a_failing_grammar_allows_only_the_end_and_says_why() {
        let grammars = Grammars::new(&smollm2(), 49152).unwrap();
        let mut c = grammars
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "object"}),
            ))
            .unwrap();
        c.next_mask();
        assert_eq!(c.failure(), None);
        c.matcher.test_trigger_lexer_error().unwrap_err();
        assert_eq!(allowed(&c.next_mask()), smollm2().end_of_generation_ids());
        assert!(c.failure().is_some());
    }

    #[test]
    fn values_fit_their_schema_or_not() {
        let grammars = Grammars::new(&smollm2(), 49152).unwrap();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
            "additionalProperties": false,
        });
        for (value, fits) in [
            (serde_json::json!({"city": "Paris"}), true),
            (serde_json::json!({"city": "Paris", "days": 3}), true),
            (serde_json::json!({"days": 3}), false),
            (serde_json::json!({"city": 3}), false),
            (serde_json::json!({"city": "Paris", "days": 0}), false),
            (serde_json::json!({"city": "Paris", "when": "now"}), false),
            (serde_json::json!({"city": "Pa\"ris\n✓"}), true),
        ] {
            assert_eq!(grammars.fits(&schema, &value), fits, "{value}");
        }
    }

    #[test]
    fn a_lark_grammar_and_a_wrong_one() {
        let tokenizer = smollm2();
        let grammars = Grammars::new(&tokenizer, 49152).unwrap();
        let mut c = grammars
            .compile(&GrammarSpec::Lark(r#"start: "yes" | "no""#.into()))
            .unwrap();
        assert_eq!(spell(&tokenizer, &mut c, "no"), "no");
        assert_eq!(allowed(&c.next_mask()), tokenizer.end_of_generation_ids());
        let e = grammars
            .compile(&GrammarSpec::Lark("start: (".into()))
            .unwrap_err();
        assert!(!e.is_empty());
        let e = grammars
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "nonsense"}),
            ))
            .unwrap_err();
        assert!(e.contains("nonsense"), "{e}");
        // A keyword llguidance does not implement is refused by name, not ignored.
        let e = grammars
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "array", "uniqueItems": true}),
            ))
            .unwrap_err();
        assert!(e.contains("uniqueItems"), "{e}");
    }

    #[test]
    fn tool_call_grammars_compile_and_force_a_call() {
        let tokenizer = smollm2();
        let grammars = Grammars::new(&tokenizer, 49152).unwrap();
        let tools = [strata_model::Tool {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }];
        let lark = strata_model::ToolCallFormat::Tagged.grammar(&tools);
        let mut c = grammars.compile(&GrammarSpec::Lark(lark)).unwrap();
        let call = "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call>";
        assert_eq!(spell(&tokenizer, &mut c, call), call);
        let lark = strata_model::ToolCallFormat::Json.grammar(&tools);
        let mut c = grammars.compile(&GrammarSpec::Lark(lark)).unwrap();
        let call = "{\"name\":\"get_weather\",\"parameters\":{\"city\":\"Oslo\"}}";
        assert_eq!(spell(&tokenizer, &mut c, call), call);
    }
}
