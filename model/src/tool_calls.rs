//! How a family writes function calls in its replies: read back out of the text as it streams, and
//! written as a grammar that makes the model call one.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::chat::Tool;

/// The call syntax a chat template teaches its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, any number, between or after
    /// text (Qwen2.5, Hermes).
    Tagged,
    /// The whole reply is a JSON object `{"name": ..., "parameters": {...}}` (or several,
    /// separated by `;`), optionally after `<|python_tag|>` (Llama 3.1 and later).
    Json,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
/// Some models (Qwen2.5-Coder among them) write a lone call as a fenced JSON block instead.
const JSON_FENCE: &str = "```json";

/// Mistral's templates teach `[TOOL_CALLS] [{"name": ..., "arguments": ...}]`, which strata does
/// not read.
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";

impl ToolCallFormat {
    /// The format of a template that takes `tools`, told by the syntax it shows the model:
    /// `None` when it takes no tools, an error naming the syntax when strata cannot read it.
    pub fn of_template(source: &str) -> Option<Result<Self, String>> {
        if !source.contains("tools") {
            return None;
        }
        Some(if source.contains(MISTRAL_CALLS) {
            Err(format!(
                "this model writes function calls in Mistral's {MISTRAL_CALLS} format, which strata \
                 does not read yet: send the request without tools"
            ))
        } else if source.contains(OPEN) {
            Ok(Self::Tagged)
        } else {
            Ok(Self::Json)
        })
    }

    /// A Lark grammar (llguidance's dialect) for replies that are only calls, one or more, to
    /// `tools`, each with arguments valid under that tool's schema.
    pub fn grammar(self, tools: &[Tool]) -> String {
        let arguments_key = match self {
            Self::Tagged => "arguments",
            Self::Json => "parameters",
        };
        let one_of: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        arguments_key: t.parameters,
                    },
                    "required": ["name", arguments_key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let call = json!({"anyOf": one_of});
        match self {
            Self::Tagged => format!(
                "start: call (\"\\n\" call)*\ncall: {open:?} \"\\n\" body \"\\n\" {close:?}\nbody: %json {call}\n",
                open = OPEN,
                close = CLOSE,
            ),
            Self::Json => format!("start: body (\"; \" body)*\nbody: %json {call}\n"),
        }
    }
}

/// A function call read from the model's output; `arguments` is a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Value,
}

/// A part of the output: text for `content`, or a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputPiece {
    Text(String),
    Call(ParsedCall),
}

/// Whether a parsed call is one the request can take: it names an offered tool, and its arguments
/// fit that tool's schema.
pub type CallCheck = Arc<dyn Fn(&ParsedCall) -> bool + Send + Sync>;

/// How one request's output is read for calls: the family's syntax, and which calls count.
#[derive(Clone)]
pub struct CallReader {
    pub format: ToolCallFormat,
    check: CallCheck,
}

impl std::fmt::Debug for CallReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallReader")
            .field("format", &self.format)
            .finish()
    }
}

impl CallReader {
    pub fn new(format: ToolCallFormat, check: CallCheck) -> Self {
        Self { format, check }
    }

    /// A parser for one output.
    pub fn parser(&self) -> ToolCallParser {
        ToolCallParser {
            reader: self.clone(),
            held: String::new(),
            state: State::Undecided,
        }
    }
}

/// Splits streamed output into text and calls. Text that may still turn out to open a call is held
/// back, so no part of a call's syntax is ever streamed as content; a call that does not parse, has
/// fields besides its name and arguments, or fails the reader's check, is given back as the text it
/// was (a JSON reply with a `name` is not a call unless it is exactly one to an offered tool).
#[derive(Debug)]
pub struct ToolCallParser {
    reader: CallReader,
    held: String,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Plain text (Tagged: until an opening tag; Json: the reply is not a call).
    Text,
    /// Inside `<tool_call>` ... `</tool_call>`.
    InCall,
    /// Nothing but whitespace (or the start of a fence) yet.
    Undecided,
    /// The reply opens as a JSON object (bare, fenced, or after `<|python_tag|>`): calls if it
    /// parses as calls, read whole at the end.
    Calls,
}

impl ToolCallParser {
    fn parse_call(&self, body: &str) -> Option<ParsedCall> {
        parse_call(self.reader.format, body).filter(|call| (self.reader.check)(call))
    }

    /// Takes the next text and returns what is known now.
    pub fn push(&mut self, text: &str) -> Vec<OutputPiece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Text if self.reader.format == ToolCallFormat::Json => {
                    let end = self.held.len();
                    out.extend(take_text(&mut self.held, end));
                    return out;
                }
                State::Text => match self.held.find(OPEN) {
                    Some(at) => {
                        out.extend(take_text(&mut self.held, at));
                        self.held.drain(..OPEN.len());
                        self.state = State::InCall;
                    }
                    None => {
                        let end = self.held.len() - partial_suffix(&self.held, OPEN);
                        out.extend(take_text(&mut self.held, end));
                        return out;
                    }
                },
                State::InCall => match self.held.find(CLOSE) {
                    Some(at) => {
                        let body: String = self.held.drain(..at + CLOSE.len()).collect();
                        let body = &body[..at];
                        out.push(match self.parse_call(body) {
                            Some(call) => OutputPiece::Call(call),
                            None => OutputPiece::Text(format!("{OPEN}{body}{CLOSE}")),
                        });
                        self.state = State::Text;
                    }
                    None => return out,
                },
                State::Undecided => {
                    let start = self.held.trim_start();
                    let opens = [PYTHON_TAG, JSON_FENCE, OPEN];
                    if start.is_empty()
                        || opens
                            .iter()
                            .any(|o| o.starts_with(start) && start.len() < o.len())
                    {
                        return out;
                    }
                    self.state = if start.starts_with('{')
                        || start.starts_with(PYTHON_TAG)
                        || start.starts_with(JSON_FENCE)
                    {
                        State::Calls
                    } else {
                        State::Text
                    };
                }
                State::Calls => return out,
            }
        }
    }

    /// The end of the output: what was held back, as calls where it parses and text otherwise.
    pub fn finish(&mut self) -> Vec<OutputPiece> {
        let held = std::mem::take(&mut self.held);
        let state = std::mem::replace(&mut self.state, State::Text);
        let as_text = |text: String| (!text.is_empty()).then_some(OutputPiece::Text(text));
        match state {
            State::Text | State::Undecided => as_text(held).into_iter().collect(),
            // A model that ends its reply at the call may leave the closing tag out.
            State::InCall => match self.parse_call(&held) {
                Some(call) => vec![OutputPiece::Call(call)],
                None => vec![OutputPiece::Text(format!("{OPEN}{held}"))],
            },
            State::Calls => {
                let body = held.trim();
                let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
                let body = match body.strip_prefix(JSON_FENCE) {
                    Some(fenced) => fenced.strip_suffix("```").unwrap_or(fenced),
                    None => body,
                };
                let calls: Option<Vec<OutputPiece>> = match self.parse_call(body) {
                    Some(call) => Some(vec![OutputPiece::Call(call)]),
                    None => body
                        .split(';')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| self.parse_call(s).map(OutputPiece::Call))
                        .collect(),
                };
                match calls {
                    Some(calls) if !calls.is_empty() => calls,
                    _ => as_text(held).into_iter().collect(),
                }
            }
        }
    }
}

/// Removes `held[..end]` and returns it as text, if there is any.
fn take_text(held: &mut String, end: usize) -> Option<OutputPiece> {
    (end > 0).then(|| OutputPiece::Text(held.drain(..end).collect()))
}

/// The length of the longest end of `text` that begins `marker` (without being all of it).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// `{"name": ..., "arguments" | "parameters": {...}}` (the format's own key first: models of
/// either family use both), nothing else in it; arguments given as JSON text (as some models write
/// them) are read as the object they hold.
fn parse_call(format: ToolCallFormat, body: &str) -> Option<ParsedCall> {
    let Value::Object(mut value) = serde_json::from_str(body.trim()).ok()? else {
        return None;
    };
    let name = value.remove("name")?.as_str()?.to_string();
    let keys = match format {
        ToolCallFormat::Tagged => ["arguments", "parameters"],
        ToolCallFormat::Json => ["parameters", "arguments"],
    };
    let given = value.remove(keys[0]).or_else(|| value.remove(keys[1]));
    let arguments = match given {
        None => json!({}),
        Some(Value::String(text)) => serde_json::from_str(&text).ok()?,
        Some(v) => v,
    };
    (value.is_empty() && arguments.is_object()).then_some(ParsedCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads calls to `f`, `g`, `get_weather` and `now`, with any arguments but `{"bad": ...}`.
    fn reader(format: ToolCallFormat) -> CallReader {
        CallReader::new(
            format,
            Arc::new(|c: &ParsedCall| {
                ["f", "g", "get_weather", "now"].contains(&c.name.as_str())
                    && c.arguments.get("bad").is_none()
            }),
        )
    }

    fn run(format: ToolCallFormat, pieces: &[&str]) -> Vec<OutputPiece> {
        let mut parser = reader(format).parser();
        let mut out: Vec<OutputPiece> = pieces.iter().flat_map(|p| parser.push(p)).collect();
        out.extend(parser.finish());
        // Adjacent texts are one text, however they were streamed.
        out.into_iter().fold(Vec::new(), |mut acc, piece| {
            match (acc.last_mut(), piece) {
                (Some(OutputPiece::Text(a)), OutputPiece::Text(b)) => a.push_str(&b),
                (_, piece) => acc.push(piece),
            }
            acc
        })
    }

    fn text(s: &str) -> OutputPiece {
        OutputPiece::Text(s.into())
    }

    fn call(name: &str, arguments: Value) -> OutputPiece {
        OutputPiece::Call(ParsedCall {
            name: name.into(),
            arguments,
        })
    }

    #[test]
    fn tagged_calls_come_out_of_the_text_however_it_is_split() {
        let output = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let expected = vec![
            text("Let me check.\n"),
            call("get_weather", json!({"city": "Paris"})),
            text("\n"),
            call("now", json!({})),
        ];
        assert_eq!(run(ToolCallFormat::Tagged, &[output]), expected);
        // Character by character: the tag's first characters are held, never streamed.
        let chars: Vec<String> = output.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        let mut parser = reader(ToolCallFormat::Tagged).parser();
        for c in &chars {
            for piece in parser.push(c) {
                if let OutputPiece::Text(t) = piece {
                    assert!(!t.contains('<'), "{t:?} streamed as content");
                }
            }
        }
        assert_eq!(run(ToolCallFormat::Tagged, &chars), expected);
    }

    #[test]
    fn tagged_edge_cases() {
        let table: &[(&[&str], Vec<OutputPiece>)] = &[
            // No call: all text, a lone `<` included.
            (&["a < b", " and <tool"], vec![text("a < b and <tool")]),
            // No closing tag before the end: still a call if it parses.
            (
                &["<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}"],
                vec![call("f", json!({"x": 1}))],
            ),
            // Arguments as JSON text.
            (
                &["<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 2}\"}</tool_call>"],
                vec![call("f", json!({"x": 2}))],
            ),
            // A body that does not parse is text, as written.
            (
                &["<tool_call>not json</tool_call> ok"],
                vec![text("<tool_call>not json</tool_call> ok")],
            ),
            (
                &["<tool_call>{\"name\": 3}"],
                vec![text("<tool_call>{\"name\": 3}")],
            ),
            (
                &["<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>"],
                vec![text(
                    "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
                )],
            ),
            // A lone call as a fenced JSON block (Qwen2.5-Coder's habit), or bare.
            (
                &[
                    "```js",
                    "on\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n```",
                ],
                vec![call("f", json!({"x": 1}))],
            ),
            (&["{\"name\": \"f\"}"], vec![call("f", json!({}))]),
            // A fenced block that is no call, and code, stay text.
            (
                &["```json\n[1, 2]\n```"],
                vec![text("```json\n[1, 2]\n```")],
            ),
            (
                &["```python\nx = 1\n```"],
                vec![text("```python\nx = 1\n```")],
            ),
            // Multi-byte characters next to a held tag prefix.
            (&["é<", "tool_c", "é"], vec![text("é<tool_cé")]),
            // Not an offered tool, arguments the check refuses, or fields besides the name and
            // one arguments key: text, as written.
            (
                &["<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>"],
                vec![text(
                    "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
                )],
            ),
            (
                &["<tool_call>{\"name\": \"f\", \"arguments\": {\"bad\": 1}}</tool_call>"],
                vec![text(
                    "<tool_call>{\"name\": \"f\", \"arguments\": {\"bad\": 1}}</tool_call>",
                )],
            ),
            (
                &["{\"name\": \"f\", \"arguments\": {}, \"parameters\": {}}"],
                vec![text(
                    "{\"name\": \"f\", \"arguments\": {}, \"parameters\": {}}",
                )],
            ),
            (
                &["{\"name\": \"f\", \"age\": 3}"],
                vec![text("{\"name\": \"f\", \"age\": 3}")],
            ),
        ];
        for (pieces, expected) in table {
            assert_eq!(&run(ToolCallFormat::Tagged, pieces), expected, "{pieces:?}");
        }
    }

    #[test]
    fn json_replies_are_calls_or_text() {
        let table: &[(&[&str], Vec<OutputPiece>)] = &[
            (
                &["  {\"name\": \"f\", ", "\"parameters\": {\"a\": \"b\"}}"],
                vec![call("f", json!({"a": "b"}))],
            ),
            (
                &["<|python", "_tag|>{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {\"n\": 1}}"],
                vec![call("f", json!({})), call("g", json!({"n": 1}))],
            ),
            (&["The answer is 4."], vec![text("The answer is 4.")]),
            (&["{not a call"], vec![text("{not a call")]),
            // A structured reply with a `name` is content, not a call.
            (
                &["{\"name\": \"Ann\", \"age\": 3}"],
                vec![text("{\"name\": \"Ann\", \"age\": 3}")],
            ),
            (
                &["{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"rm\", \"parameters\": {}}"],
                vec![text("{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"rm\", \"parameters\": {}}")],
            ),
            (&[], vec![]),
        ];
        for (pieces, expected) in table {
            assert_eq!(&run(ToolCallFormat::Json, pieces), expected, "{pieces:?}");
        }
    }

    #[test]
    fn formats_follow_the_template() {
        assert_eq!(ToolCallFormat::of_template("{{ messages }}"), None);
        assert_eq!(
            ToolCallFormat::of_template("{% if tools %}<tool_call>{% endif %}"),
            Some(Ok(ToolCallFormat::Tagged))
        );
        assert_eq!(
            ToolCallFormat::of_template(
                "{% if tools is not none %}{{ tools | tojson }}{% endif %}"
            ),
            Some(Ok(ToolCallFormat::Json))
        );
        let mistral = "{% if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        let refused = ToolCallFormat::of_template(mistral).unwrap().unwrap_err();
        assert!(refused.contains("Mistral's [TOOL_CALLS]"), "{refused}");
    }

    #[test]
    fn grammars_name_every_tool_and_its_schema() {
        let tools = [Tool {
            name: "get_weather".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }];
        let tagged = ToolCallFormat::Tagged.grammar(&tools);
        assert!(tagged.contains("\"<tool_call>\""), "{tagged}");
        assert!(tagged.contains("{\"const\":\"get_weather\"}"), "{tagged}");
        assert!(tagged.contains("\"arguments\""), "{tagged}");
        assert!(ToolCallFormat::Json
            .grammar(&tools)
            .contains("\"parameters\""));
    }
}
