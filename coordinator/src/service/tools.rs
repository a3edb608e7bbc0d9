//! Tools, tool choice and output constraints of a request: wire types checked and turned into the
//! template's messages and tools, the family's call format, and a grammar.

use serde_json::Value;
use strata_model::{
    CallReader, ChatMessage, ChatTemplate, OutputPiece, ParsedCall, Tool, ToolCall, ToolCallFormat,
};
use strata_proto::v1;

use crate::grammar::GrammarSpec;

/// The most tools one request may offer.
pub const MAX_TOOLS: usize = 128;
const MAX_NAME: usize = 64;

/// What a request's tools and constraint come to.
#[derive(Debug, Default)]
pub struct ToolUse {
    /// What the template is told of.
    pub tools: Vec<Tool>,
    /// How calls in the output are read back, when tools are offered.
    pub format: Option<ToolCallFormat>,
    /// The grammar the output must follow: the request's own, or a forced call's.
    pub grammar: Option<GrammarSpec>,
}

/// The template's messages of a request, tool calls' arguments read as JSON objects.
pub fn chat_messages(messages: &[v1::ChatMessage]) -> Result<Vec<ChatMessage>, String> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let tool_calls = m
                .tool_calls
                .iter()
                .map(|c| {
                    let arguments = json_object(&c.arguments_json).map_err(|e| {
                        format!("message {i}: the arguments of tool call {:?}: {e}", c.id)
                    })?;
                    Ok(ToolCall {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        arguments,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
            Ok(ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
                tool_calls,
                tool_call_id: text(&m.tool_call_id),
                name: text(&m.name),
            })
        })
        .collect()
}

/// JSON text that must be an object; empty is `{}`.
fn json_object(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON ({e})")),
    }
}

/// Checks the request's tools, tool choice and constraint against each other and the template.
pub fn tool_use(r: &v1::GenerateRequest, chat: Option<&ChatTemplate>) -> Result<ToolUse, String> {
    let constraint = r
        .constraint
        .as_ref()
        .and_then(|c| c.grammar.as_ref())
        .map(|g| match g {
            v1::output_constraint::Grammar::JsonSchema(text) => serde_json::from_str(text)
                .map(GrammarSpec::JsonSchema)
                .map_err(|e| format!("the output's JSON Schema is not JSON: {e}")),
            v1::output_constraint::Grammar::Lark(lark) => Ok(GrammarSpec::Lark(lark.clone())),
        })
        .transpose()?;
    if constraint.is_some() && r.ignore_eos {
        return Err("a constrained output ends when its grammar does: drop ignore_eos".into());
    }
    if constraint.is_some() && !r.stop.is_empty() {
        return Err(STOP_WITH_GRAMMAR.into());
    }
    let choice = r.tool_choice.as_ref().and_then(|c| c.choice.clone());
    if r.tools.is_empty() {
        return match choice {
            None | Some(v1::tool_choice::Choice::Mode(0 | 1)) => Ok(ToolUse {
                grammar: constraint,
                ..ToolUse::default()
            }),
            Some(_) => Err("tool_choice asks for a call, but no tools are given".into()),
        };
    }
    if r.messages.is_empty() {
        return Err("tools go with chat messages, not a plain prompt".into());
    }
    if r.tools.len() > MAX_TOOLS {
        return Err(format!(
            "{} tools; at most {MAX_TOOLS} are allowed",
            r.tools.len()
        ));
    }
    let tools = r.tools.iter().map(tool).collect::<Result<Vec<_>, _>>()?;
    if let Some(dup) = tools
        .iter()
        .enumerate()
        .find(|(i, t)| tools[..*i].iter().any(|o| o.name == t.name))
    {
        return Err(format!("two tools are named {:?}", dup.1.name));
    }
    let mode = match &choice {
        None => v1::ToolMode::Auto,
        Some(v1::tool_choice::Choice::Mode(m)) => v1::ToolMode::try_from(*m)
            .map_err(|_| format!("tool_choice mode {m} is not one strata knows"))?,
        Some(v1::tool_choice::Choice::Function(_)) => v1::ToolMode::Required,
    };
    if mode == v1::ToolMode::None {
        return Ok(ToolUse {
            grammar: constraint,
            ..ToolUse::default()
        });
    }
    let format =
        match chat.and_then(ChatTemplate::tool_format) {
            Some(Ok(format)) => format,
            Some(Err(why)) => return Err(why),
            None => return Err(
                "this model's chat template takes no tools: it was not trained to call functions"
                    .into(),
            ),
        };
    // Under the client's own output constraint the reply is that structured output, whatever
    // fields it has (a `name` among them): content, never read as a call.
    let reads_calls = constraint.is_none();
    let grammar = if mode == v1::ToolMode::Required {
        if constraint.is_some() {
            return Err(
                "a forced tool call is a grammar of its own: drop the output constraint".into(),
            );
        }
        if r.ignore_eos {
            return Err("a forced tool call ends when the call does: drop ignore_eos".into());
        }
        let callable: Vec<Tool> = match &choice {
            Some(v1::tool_choice::Choice::Function(name)) => {
                let Some(t) = tools.iter().find(|t| &t.name == name) else {
                    return Err(format!(
                        "tool_choice names {name:?}, which is not among the tools"
                    ));
                };
                vec![t.clone()]
            }
            _ => tools.clone(),
        };
        Some(GrammarSpec::Lark(format.grammar(&callable)))
    } else {
        constraint
    };
    if grammar.is_some() && !r.stop.is_empty() {
        return Err(STOP_WITH_GRAMMAR.into());
    }
    Ok(ToolUse {
        tools,
        format: reads_calls.then_some(format),
        grammar,
    })
}

/// Stop strings could cut a constrained output before its grammar completes, leaving text that
/// does not follow it.
const STOP_WITH_GRAMMAR: &str =
    "stop strings could cut the output before its grammar completes: drop stop, or the output constraint";

fn tool(t: &v1::Tool) -> Result<Tool, String> {
    let name_ok = !t.name.is_empty()
        && t.name.len() <= MAX_NAME
        && t.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name_ok {
        return Err(format!(
            "tool name {:?}: use 1 to {MAX_NAME} letters, digits, `_` or `-`",
            t.name
        ));
    }
    let parameters = if t.parameters_json.trim().is_empty() {
        serde_json::json!({"type": "object", "properties": {}})
    } else {
        json_object(&t.parameters_json)
            .map_err(|e| format!("the parameters of tool {:?}: {e}", t.name))?
    };
    Ok(Tool {
        name: t.name.clone(),
        description: (!t.description.is_empty()).then(|| t.description.clone()),
        parameters,
    })
}

/// A generated output split into its text and its calls (a whole output's
/// [`ToolCallParser`]).
pub fn split_output(reader: &CallReader, text: &str) -> (String, Vec<ParsedCall>) {
    let mut parser = reader.parser();
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            OutputPiece::Text(t) => content.push_str(&t),
            OutputPiece::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

/// A call as the wire and the OpenAI API show it, with a made-up id (`call_` and 24 hex digits).
pub fn wire_call(call: &ParsedCall) -> v1::ToolCall {
    v1::ToolCall {
        id: format!(
            "call_{:016x}{:08x}",
            crate::service::random_u64(),
            crate::service::random_u64() as u32
        ),
        name: call.name.clone(),
        arguments_json: call.arguments.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        tools: Vec<v1::Tool>,
        choice: Option<v1::tool_choice::Choice>,
    ) -> v1::GenerateRequest {
        v1::GenerateRequest {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            tools,
            tool_choice: choice.map(|c| v1::ToolChoice { choice: Some(c) }),
            ..Default::default()
        }
    }

    fn weather() -> v1::Tool {
        v1::Tool {
            name: "get_weather".into(),
            description: "Weather in a city".into(),
            parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#.into(),
        }
    }

    fn tagged() -> ChatTemplate {
        ChatTemplate::new(
            std::path::Path::new("m"),
            "{% if tools %}<tool_call>{% endif %}{{ messages[0].content }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap()
    }

    #[test]
    fn tools_and_choices_are_checked() {
        use v1::tool_choice::Choice;
        let t = tagged();
        let plain = ChatTemplate::new(
            std::path::Path::new("m"),
            "{{ messages[0].content }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let ok = tool_use(&request(vec![weather()], None), Some(&t)).unwrap();
        assert_eq!(ok.format, Some(ToolCallFormat::Tagged));
        assert_eq!(ok.grammar, None);
        let forced = tool_use(
            &request(
                vec![weather()],
                Some(Choice::Function("get_weather".into())),
            ),
            Some(&t),
        )
        .unwrap();
        assert!(matches!(forced.grammar, Some(GrammarSpec::Lark(g)) if g.contains("get_weather")));
        let none = tool_use(
            &request(
                vec![weather()],
                Some(Choice::Mode(v1::ToolMode::None as i32)),
            ),
            Some(&t),
        )
        .unwrap();
        assert!(none.tools.is_empty() && none.format.is_none());
        // The client's own schema under `auto`: its reply is that output, never read as a call.
        let schema = v1::OutputConstraint {
            grammar: Some(v1::output_constraint::Grammar::JsonSchema(
                r#"{"type":"object","properties":{"name":{"type":"string"}}}"#.into(),
            )),
        };
        let structured = tool_use(
            &v1::GenerateRequest {
                constraint: Some(schema.clone()),
                ..request(vec![weather()], None)
            },
            Some(&t),
        )
        .unwrap();
        assert!(structured.format.is_none() && structured.grammar.is_some());
        assert_eq!(structured.tools.len(), 1);
        let bad_name = v1::Tool {
            name: "get weather".into(),
            ..weather()
        };
        let bad_schema = v1::Tool {
            parameters_json: "[1]".into(),
            ..weather()
        };
        let cases: Vec<(v1::GenerateRequest, Option<&ChatTemplate>, &str)> = vec![
            (
                request(vec![weather()], None),
                Some(&plain),
                "takes no tools",
            ),
            (request(vec![weather()], None), None, "takes no tools"),
            (
                request(vec![bad_name], None),
                Some(&t),
                "tool name \"get weather\"",
            ),
            (
                request(vec![bad_schema], None),
                Some(&t),
                "not a JSON object",
            ),
            (
                request(vec![weather(), weather()], None),
                Some(&t),
                "two tools",
            ),
            (
                request(vec![weather()], Some(Choice::Function("nope".into()))),
                Some(&t),
                "not among the tools",
            ),
            (
                request(vec![], Some(Choice::Mode(v1::ToolMode::Required as i32))),
                Some(&t),
                "no tools are given",
            ),
            (
                request(vec![weather(); MAX_TOOLS + 1], None),
                Some(&t),
                "at most 128",
            ),
            (
                v1::GenerateRequest {
                    ignore_eos: true,
                    ..request(vec![weather()], Some(Choice::Mode(2)))
                },
                Some(&t),
                "drop ignore_eos",
            ),
            (
                v1::GenerateRequest {
                    constraint: Some(v1::OutputConstraint {
                        grammar: Some(v1::output_constraint::Grammar::JsonSchema("{".into())),
                    }),
                    ..request(vec![], None)
                },
                Some(&t),
                "not JSON",
            ),
            (
                v1::GenerateRequest {
                    prompt: "x".into(),
                    messages: vec![],
                    ..request(vec![weather()], None)
                },
                Some(&t),
                "not a plain prompt",
            ),
            // Stop strings could cut a constrained output short.
            (
                v1::GenerateRequest {
                    constraint: Some(schema.clone()),
                    stop: vec!["}".into()],
                    ..request(vec![], None)
                },
                Some(&t),
                "drop stop",
            ),
            (
                v1::GenerateRequest {
                    stop: vec!["}".into()],
                    ..request(vec![weather()], Some(Choice::Mode(2)))
                },
                Some(&t),
                "drop stop",
            ),
        ];
        for (r, template, want) in cases {
            let e = tool_use(&r, template).unwrap_err();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }

    #[test]
    fn history_calls_need_object_arguments() {
        let call = |args: &str| v1::ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![v1::ToolCall {
                id: "c1".into(),
                name: "f".into(),
                arguments_json: args.into(),
            }],
            ..Default::default()
        };
        let ok = chat_messages(&[call(r#"{"a": 1}"#), call("")]).unwrap();
        assert_eq!(ok[0].tool_calls[0].arguments, serde_json::json!({"a": 1}));
        assert_eq!(ok[1].tool_calls[0].arguments, serde_json::json!({}));
        let e = chat_messages(&[call("[1]")]).unwrap_err();
        assert!(e.contains("tool call \"c1\""), "{e}");
    }

    #[test]
    fn outputs_split_into_content_and_calls() {
        let reader = CallReader::new(
            ToolCallFormat::Tagged,
            std::sync::Arc::new(|c| c.name == "f"),
        );
        let (content, calls) = split_output(
            &reader,
            "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(content, "Sure.\n");
        assert_eq!(calls.len(), 1);
        let wire = wire_call(&calls[0]);
        assert!(
            wire.id.starts_with("call_") && wire.id.len() == 29,
            "{}",
            wire.id
        );
        assert_eq!(wire.arguments_json, "{}");
    }
}
