//! `strata generate`.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use futures::StreamExt;
use serde_json::json;
use strata_client::client::collect;
use strata_client::{Event, GenerateParams, Generation, OutputConstraint, StrataClient};

use super::cluster::ClusterArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt text (used as is unless --chat: no template, no BOS unless the model asks for one).
    #[arg(
        long,
        required_unless_present = "prompts_file",
        conflicts_with = "prompts_file"
    )]
    prompt: Option<String>,
    /// Generate for every line of this file at once (a batch); prints one JSON line per prompt, in order.
    #[arg(long)]
    prompts_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Skip warming the local stages.
    #[arg(long)]
    no_warmup: bool,
    /// New tokens at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// 0 is greedy; higher is more random.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1 disables).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Keep only tokens at least this fraction as likely as the most likely one (0 disables).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Subtract this from the logit of every token generated so far, once (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Subtract this from a token's logit per time it was generated (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// Divide positive logits (multiply negative ones) of tokens in the prompt or output by this
    /// (1 disables).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Add BIAS to token ID's logit, as `ID=BIAS` (repeatable; -100 bans the token).
    #[arg(long, value_parser = parse_bias, allow_hyphen_values = true)]
    logit_bias: Vec<(u32, f32)>,
    /// Seed of the sampler (default: random). The same seed gives the same text.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past the model's end-of-generation token.
    #[arg(long)]
    ignore_eos: bool,
    /// Send the prompt as a user message in the model's chat template (as the OpenAI chat API does).
    #[arg(long, conflicts_with = "parse_special")]
    chat: bool,
    /// Read control-token text in the prompt (`<|im_start|>`) as those tokens; by default it is
    /// text, like the rest of the prompt.
    #[arg(long)]
    parse_special: bool,
    /// Constrain the output to this JSON Schema (JSON text, or @FILE): it always parses and
    /// validates.
    #[arg(long, conflicts_with = "grammar")]
    json_schema: Option<String>,
    /// Constrain the output to this grammar in llguidance's Lark dialect (text, or @FILE).
    #[arg(long)]
    grammar: Option<String>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// `TEXT`, or the contents of FILE for `@FILE`.
fn text_or_file(arg: &str) -> anyhow::Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))
        }
        None => Ok(arg.to_string()),
    }
}

/// `ID=BIAS`, as `--logit-bias` takes it.
fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=BIAS"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("{id:?} is not a token id"))?;
    let bias = bias
        .trim()
        .parse()
        .map_err(|_| format!("{bias:?} is not a number"))?;
    Ok((id, bias))
}

pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
        logit_bias: args.logit_bias.clone(),
        stop: args.stop.clone(),
        top_logprobs: if args.json { 5 } else { 0 },
        ignore_eos: args.ignore_eos,
        chat: args.chat,
        parse_special: args.parse_special,
        constraint: match (&args.json_schema, &args.grammar) {
            (Some(schema), _) => Some(OutputConstraint::JsonSchema(text_or_file(schema)?)),
            (None, Some(lark)) => Some(OutputConstraint::Lark(text_or_file(lark)?)),
            (None, None) => None,
        },
    };
    if let Some(url) = &args.cluster.coordinator {
        let client = args.cluster.connect(url).await?;
        return generate(&client, &args, &params).await;
    }
    let cluster = args.cluster.start_local(!args.no_warmup).await?;
    let client = cluster.client().await;
    let result = match client {
        Ok(client) => generate(&client, &args, &params).await,
        Err(e) => Err(e.into()),
    };
    let stopped = cluster.stop().await;
    result?;
    stopped.map_err(anyhow::Error::msg)
}

async fn generate(
    client: &StrataClient,
    args: &GenerateArgs,
    params: &GenerateParams,
) -> anyhow::Result<()> {
    if let Some(path) = &args.prompts_file {
        return generate_batch(client, path, params).await;
    }
    let prompt = args.prompt.as_deref().unwrap_or_default();
    let stream = client.generate(prompt, params).await?;
    if args.json {
        let generation = collect(stream).await?;
        println!("{}", to_json(&generation));
        return Ok(());
    }
    let mut stream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut tokens = 0usize;
    while let Some(event) = stream.next().await {
        match event? {
            Event::Token(t) => {
                tokens += 1;
                write!(stdout, "{}", t.text)?;
                stdout.flush()?;
            }
            Event::Finished(f) => {
                writeln!(stdout, "{}", f.trailing_text)?;
                let rate = strata_client::client::decode_rate(tokens, f.ttft, f.total);
                eprintln!(
                    "[{} prompt tokens, {tokens} generated ({}), TTFT {:.0} ms, {:.1} tokens/s]",
                    f.prompt_ids.len(),
                    f.reason.as_str(),
                    f.ttft.as_secs_f64() * 1e3,
                    rate
                );
                return Ok(());
            }
        }
    }
    bail!("the coordinator closed the stream before the end of generation")
}

/// `--prompts-file`: every non-empty line is a prompt; all run at once; JSON lines out in file order.
async fn generate_batch(
    client: &StrataClient,
    path: &std::path::Path,
    params: &GenerateParams,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!("{} has no prompts (one per line)", path.display());
    }
    let params = GenerateParams {
        top_logprobs: 5,
        ..params.clone()
    };
    let results = client.generate_batch(&prompts, &params).await;
    let mut failed = 0;
    for (index, (prompt, result)) in prompts.iter().zip(results).enumerate() {
        let line = match result {
            Ok(g) => {
                let mut v = to_json(&g);
                v["index"] = json!(index);
                v["prompt"] = json!(prompt);
                v
            }
            Err(e) => {
                failed += 1;
                json!({ "index": index, "prompt": prompt, "error": e.to_string() })
            }
        };
        println!("{line}");
    }
    if failed > 0 {
        bail!("{failed} of {} prompts failed", prompts.len());
    }
    Ok(())
}

/// The `--json` object.
pub fn to_json(g: &Generation) -> serde_json::Value {
    json!({
        "prompt_ids": g.prompt_ids,
        "token_ids": g.token_ids,
        "text": g.text,
        "finish_reason": g.finish_reason.as_str(),
        "ttft_ms": g.ttft.as_secs_f64() * 1e3,
        "cached_tokens": g.cached_tokens,
        "total_ms": g.total.as_secs_f64() * 1e3,
        "tokens_per_s": g.tokens_per_s(),
        "decode_tokens_per_s": g.decode_tokens_per_s(),
        "stage_forward_ms": g.stage_forward.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        "stage_hop_ms": g.stage_hop.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        "logprobs": g.logprobs,
        "top_logprobs": g.top_logprobs.iter().map(|top| {
            top.iter().map(|(id, lp)| json!({"id": id, "logprob": lp})).collect::<Vec<_>>()
        }).collect::<Vec<_>>(),
    })
}
