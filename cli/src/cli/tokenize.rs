//! `strata tokenize`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use strata_model::{ChatMessage, ChatTemplate, ModelFile, TextTokenizer};

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The text to encode.
    text: String,
    /// The model whose tokenizer to use. Default: SmolLM2-135M-Instruct Q4_1.
    #[arg(long, env = "STRATA_MODEL")]
    model: Option<PathBuf>,
    /// Print `{"ids": [...]}` instead of one id per line.
    #[arg(long)]
    json: bool,
    /// Encode the text as one user message in the model's chat template, as the chat API does:
    /// control tokens typed in it stay text.
    #[arg(long, conflicts_with = "parse_special")]
    chat: bool,
    /// Read control-token text (`<|im_start|>`) as those tokens, as a prompt sent with
    /// `parse_special` is; by default it is text, as a prompt is.
    #[arg(long)]
    parse_special: bool,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let path = strata_harness::model_cache::resolve_model(args.model.as_deref())?;
    let model = ModelFile::open(&path)?;
    let tokenizer = TextTokenizer::load(&model)?;
    let ids = if args.chat {
        let template = ChatTemplate::load(&model)?
            .with_context(|| format!("{} has no chat template", path.display()))?;
        let messages = [ChatMessage {
            role: "user".into(),
            content: args.text,
            ..Default::default()
        }];
        template.prompt_ids(&tokenizer, &messages, &[], usize::MAX)?
    } else {
        tokenizer.encode_prompt(&args.text, args.parse_special)?
    };
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        for id in ids {
            println!("{id}");
        }
    }
    Ok(())
}
