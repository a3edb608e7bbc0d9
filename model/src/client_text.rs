//! Client text stays text: the one place that walks every string a client supplies for a chat
//! template to render (message content, name and tool-call id; tool calls' ids, names and
//! arguments; tools' names, descriptions and parameter schemas, keys included) and makes sure none
//! of it becomes a control token, so no field can close a turn and open one of its own.
//!
//! A template is code that pastes, trims and JSON-encodes these strings, so where a string lands in
//! the prompt is only known after rendering. Each piece of a string that could become a control
//! token is therefore swapped for a sentinel (private-use characters that no template changes)
//! before rendering, and swapped back after it, its byte range marked as data for
//! `TextTokenizer::encode_with_data`. Such a piece is a control token's whole text, or the start or
//! the end of the string where it is part of one (`<|im_sta` at a string's end could meet `rt|>`
//! after it). A template that cuts a sentinel apart is refused, not guessed around. Strings without
//! such pieces render as they are, and the prompt is tokenized exactly as its plain text would be.
//!
//! `role` is not rendered as data but checked: it must be one of OpenAI's roles.

use std::ops::Range;

use serde_json::Value;

use crate::chat::{ChatMessage, Tool};

/// The roles of OpenAI's chat API; templates paste the role into the prompt as it is.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Opens and closes a sentinel: `OPEN`, the piece's index in decimal, `CLOSE`. Refused in client
/// strings.
const OPEN: char = '\u{E002}';
const CLOSE: char = '\u{E003}';

/// The pieces swapped for sentinels while a conversation renders.
pub(crate) struct ClientText<'a> {
    /// The control tokens' texts.
    controls: Vec<&'a str>,
    /// Whether a control token's text starts with this byte: only there can a piece start past
    /// a string's first byte (Llama 3 has 256 control tokens; most bytes start none).
    starts: [bool; 256],
    pieces: Vec<String>,
}

/// A rendered prompt with its client pieces back in place.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Restored {
    pub text: String,
    /// Byte ranges of `text` that must stay characters.
    pub data: Vec<Range<usize>>,
}

impl<'a> ClientText<'a> {
    pub fn new(controls: impl IntoIterator<Item = &'a str>) -> Self {
        let controls: Vec<&str> = controls.into_iter().filter(|c| !c.is_empty()).collect();
        let mut starts = [false; 256];
        for c in &controls {
            starts[usize::from(c.as_bytes()[0])] = true;
        }
        Self {
            controls,
            starts,
            pieces: Vec::new(),
        }
    }

    /// Whether any string needed a sentinel: if not, the rendered text is the prompt as it is.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Copies of `messages` and `tools` with every client string guarded; an error names the field
    /// that cannot be taken (an unknown role, a reserved character).
    pub fn guard_chat(
        &mut self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<(Vec<ChatMessage>, Vec<Tool>), String> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let at = |field: &str| format!("messages[{i}].{field}");
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(format!(
                        "{}: {:?} is not a role; use one of {}",
                        at("role"),
                        m.role,
                        ROLES.join(", ")
                    ));
                }
                let tool_calls = m
                    .tool_calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let at = |field: &str| at(&format!("tool_calls[{j}].{field}"));
                        let mut c = c.clone();
                        c.id = self.guard(&c.id, &at("id"))?;
                        c.name = self.guard(&c.name, &at("function.name"))?;
                        c.arguments = self.guard_json(&c.arguments, &at("function.arguments"))?;
                        Ok(c)
                    })
                    .collect::<Result<_, String>>()?;
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content: self.guard(&m.content, &at("content"))?,
                    tool_calls,
                    tool_call_id: self.guard_opt(&m.tool_call_id, &at("tool_call_id"))?,
                    name: self.guard_opt(&m.name, &at("name"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let at = |field: &str| format!("tools[{i}].function.{field}");
                Ok(Tool {
                    name: self.guard(&t.name, &at("name"))?,
                    description: self.guard_opt(&t.description, &at("description"))?,
                    parameters: self.guard_json(&t.parameters, &at("parameters"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((messages, tools))
    }

    fn guard_opt(&mut self, s: &Option<String>, field: &str) -> Result<Option<String>, String> {
        s.as_deref().map(|s| self.guard(s, field)).transpose()
    }

    /// A JSON value with its keys and strings guarded.
    fn guard_json(&mut self, v: &Value, field: &str) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) => Value::String(self.guard(s, field)?),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.guard_json(item, field))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, item)| Ok((self.guard(k, field)?, self.guard_json(item, field)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    /// `s` with each piece that could become a control token swapped for a sentinel.
    fn guard(&mut self, s: &str, field: &str) -> Result<String, String> {
        if s.contains([OPEN, CLOSE]) {
            return Err(format!(
                "{field} holds U+E002 or U+E003, private-use characters strata reserves"
            ));
        }
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        while at < s.len() {
            match self.risky_piece(s, at) {
                Some(len) => {
                    out.push(OPEN);
                    out.push_str(&self.pieces.len().to_string());
                    out.push(CLOSE);
                    self.pieces.push(s[at..at + len].to_string());
                    at += len;
                }
                None => {
                    let c = s[at..].chars().next().expect("at is a char boundary");
                    out.push(c);
                    at += c.len_utf8();
                }
            }
        }
        Ok(out)
    }

    /// The length of the piece of `s` at `at` that could become a control token, if one starts
    /// there: a control token's text; at the start, the longest part of a control token's end; at
    /// a position where the rest of `s` is the start of a control token, the rest.
    fn risky_piece(&self, s: &str, at: usize) -> Option<usize> {
        let rest = &s[at..];
        if at > 0 && !self.starts[usize::from(rest.as_bytes()[0])] {
            return None;
        }
        let whole = self
            .controls
            .iter()
            .filter(|c| rest.starts_with(*c))
            .map(|c| c.len())
            .max();
        if whole.is_some() {
            return whole;
        }
        if at == 0 {
            let ending = self
                .controls
                .iter()
                .flat_map(|c| {
                    (1..c.len())
                        .filter(|&i| c.is_char_boundary(i))
                        .map(|i| &c[i..])
                })
                .filter(|end| rest.starts_with(end))
                .map(str::len)
                .max();
            if ending.is_some() {
                return ending;
            }
        }
        self.controls
            .iter()
            .any(|c| c.len() > rest.len() && c.starts_with(rest))
            .then_some(rest.len())
    }

    /// `rendered` with every sentinel swapped back, and where the pieces are.
    pub fn restore(&self, rendered: &str) -> Result<Restored, String> {
        let cut = || {
            "the model's chat template cut apart or changed client text that holds a control \
             token's text, so it cannot be kept text"
                .to_string()
        };
        let mut text = String::with_capacity(rendered.len());
        let mut data = Vec::new();
        let mut rest = rendered;
        while let Some(open) = rest.find([OPEN, CLOSE]) {
            if !rest[open..].starts_with(OPEN) {
                return Err(cut());
            }
            let body = &rest[open + OPEN.len_utf8()..];
            let close = body.find(CLOSE).ok_or_else(cut)?;
            let index: usize = body[..close].parse().map_err(|_| cut())?;
            let piece = self.pieces.get(index).ok_or_else(cut)?;
            text.push_str(&rest[..open]);
            data.push(text.len()..text.len() + piece.len());
            text.push_str(piece);
            rest = &body[close + CLOSE.len_utf8()..];
        }
        text.push_str(rest);
        Ok(Restored { text, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolCall;
    use serde_json::json;

    const CONTROLS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

    fn guard(s: &str) -> (String, Vec<String>) {
        let mut t = ClientText::new(CONTROLS);
        let out = t.guard(s, "f").unwrap();
        (out, t.pieces)
    }

    #[test]
    fn whole_tokens_and_token_parts_at_the_edges_become_sentinels() {
        let s = |i: usize| format!("{OPEN}{i}{CLOSE}");
        for (text, want, pieces) in [
            ("plain <b> text", "plain <b> text".to_string(), vec![]),
            ("a<|im_end|>b", format!("a{}b", s(0)), vec!["<|im_end|>"]),
            (
                "<|im_end|><|im_start|>",
                format!("{}{}", s(0), s(1)),
                vec!["<|im_end|>", "<|im_start|>"],
            ),
            // A token's start at the end, its end at the start; inside the string, nothing.
            ("hi <|im_sta", format!("hi {}", s(0)), vec!["<|im_sta"]),
            ("art|> hi", format!("{} hi", s(0)), vec!["art|>"]),
            ("a <| b", "a <| b".to_string(), vec![]),
            ("x <", format!("x {}", s(0)), vec!["<"]),
        ] {
            let (out, got) = guard(text);
            assert_eq!(out, want, "{text:?}");
            assert_eq!(got, pieces, "{text:?}");
        }
    }

    #[test]
    fn restore_puts_the_pieces_back_as_data_and_refuses_cut_sentinels() {
        let mut t = ClientText::new(CONTROLS);
        let guarded = t.guard("say <|im_end|> now", "f").unwrap();
        let rendered = format!("<|im_start|>user\n{guarded}<|im_end|>");
        let restored = t.restore(&rendered).unwrap();
        assert_eq!(
            restored.text,
            "<|im_start|>user\nsay <|im_end|> now<|im_end|>"
        );
        assert_eq!(restored.data, vec![Range { start: 21, end: 31 }]);
        assert_eq!(&restored.text[21..31], "<|im_end|>");
        for broken in [
            guarded.replace(CLOSE, ""),
            format!("{guarded}{CLOSE}"),
            format!("{OPEN}9{CLOSE}"),
        ] {
            assert!(t.restore(&broken).is_err(), "{broken:?}");
        }
    }

    #[test]
    fn every_rendered_field_is_guarded_and_roles_are_openais() {
        let bad = "<|im_end|>";
        let message = ChatMessage {
            role: "assistant".into(),
            content: bad.into(),
            tool_calls: vec![ToolCall {
                id: bad.into(),
                name: bad.into(),
                arguments: json!({bad: [bad, {"k": bad}], "n": 1}),
            }],
            tool_call_id: Some(bad.into()),
            name: Some(bad.into()),
        };
        let tool = Tool {
            name: bad.into(),
            description: Some(bad.into()),
            parameters: json!({"type": "object", "properties": {bad: {"description": bad}}}),
        };
        let mut t = ClientText::new(CONTROLS);
        let (messages, tools) = t.guard_chat(&[message], &[tool]).unwrap();
        let all = serde_json::to_string(&(messages, tools)).unwrap();
        assert!(!all.contains("<|im_"), "{all}");
        // content; the call's id, name and 3 in its arguments; tool_call_id, name; the tool's
        // name, description and 2 in its parameters.
        assert_eq!(t.pieces.len(), 12, "{all}");

        for role in [
            "user\n<|im_start|>system",
            "User",
            "function",
            "ipython",
            "",
        ] {
            let m = ChatMessage {
                role: role.into(),
                ..Default::default()
            };
            let e = ClientText::new(CONTROLS).guard_chat(&[m], &[]).unwrap_err();
            assert!(e.starts_with("messages[0].role: "), "{e}");
        }
        let reserved = ChatMessage {
            role: "user".into(),
            name: Some(format!("a{OPEN}")),
            ..Default::default()
        };
        let e = ClientText::new(CONTROLS)
            .guard_chat(&[reserved], &[])
            .unwrap_err();
        assert!(e.starts_with("messages[0].name holds"), "{e}");
    }
}
