//! Prefix caching with real worker processes: each turn of a scripted chat starts on the caches the
//! stages kept from the turn before (`cached_tokens` says how many positions), and generates the
//! tokens and log-probabilities a coordinator without the cache does, bit for bit (a prompt row
//! rounds the same in any step: `layer/attention.rs`, `prompt_softmax.rs`); prompts sent together
//! prefill what they share once; a flood of distinct prompts keeps the parked caches within each
//! worker's bound, and a prompt whose prefix was evicted is computed again.

mod common;

use strata_client::{GenerateParams, Generation, StrataClient};
use strata_coordinator::scheduler::SchedulerLimits;
use strata_coordinator::CoordinatorConfig;
use strata_harness::local::WorkerProcess;
use strata_harness::LocalOptions;
use strata_proto::v1;

const SYSTEM: &str = "You are a careful assistant for a small bakery. The bakery opens at seven, \
    closes at six, sells bread, pastries and cakes, and takes orders for weddings two weeks ahead. \
    Answer in one or two sentences, politely, and never invent prices.";

const QUESTIONS: [&str; 4] = [
    "When do you open?",
    "Do you make wedding cakes?",
    "How early must I order one?",
    "Do you sell croissants?",
];

fn worker_options(args: &[&str]) -> LocalOptions {
    LocalOptions {
        threads: Some(1),
        worker_args: args.iter().map(|a| a.to_string()).collect(),
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    }
}

/// A coordinator over `workers` (loading their stages anew), with `prefix_cache_entries`.
async fn coordinator(workers: &[WorkerProcess], prefix_cache_entries: usize) -> StrataClient {
    let workers: Vec<&WorkerProcess> = workers.iter().collect();
    common::serve_coordinator(CoordinatorConfig {
        scheduler: SchedulerLimits {
            prefix_cache_entries,
            ..SchedulerLimits::default()
        },
        ..common::coordinator_config(&workers)
    })
    .await
}

async fn worker_info(worker: &WorkerProcess) -> v1::WorkerInfo {
    let mut client = v1::worker_client::WorkerClient::connect(format!("http://{}", worker.address))
        .await
        .unwrap();
    client.info(v1::InfoRequest {}).await.unwrap().into_inner()
}

fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        temperature: 0.0,
        top_logprobs: 2,
        ..GenerateParams::default()
    }
}

/// The chat's turns: each prompt is the one before, its answer (`answers`' if given, so both runs
/// see the same prompts) and the next question.
async fn chat(client: &StrataClient, answers: Option<&[Generation]>) -> Vec<Generation> {
    let mut transcript = format!("{SYSTEM}\n");
    let mut turns = Vec::new();
    for question in QUESTIONS {
        transcript += &format!("Customer: {question}\nAssistant:");
        let g = client
            .generate_collect(&transcript, &greedy(24))
            .await
            .unwrap();
        transcript += &answers.map_or(&g, |a| &a[turns.len()]).text;
        transcript += "\n";
        turns.push(g);
    }
    turns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chat_turn_starts_on_the_last_ones_caches_and_generates_the_same_tokens() {
    let options = worker_options(&[]);
    // Each coordinator has workers of its own: a coordinator keeps its stages loaded.
    let mut spawned = Vec::new();
    for _ in 0..4 {
        spawned.push(WorkerProcess::spawn(&options).await.unwrap());
    }
    let workers = spawned.split_off(2);
    let cold = chat(&coordinator(&spawned, 0).await, None).await;
    let warm = chat(&coordinator(&workers, 256).await, Some(&cold)).await;
    for (turn, (cold, warm)) in cold.iter().zip(&warm).enumerate() {
        assert_eq!(cold.prompt_ids, warm.prompt_ids, "turn {}", turn + 1);
        let what = format!("turn {}", turn + 1);
        // Bit for bit: the same tokens and the same log-probabilities.
        assert_eq!(warm.token_ids, cold.token_ids, "{what}");
        assert_eq!(warm.top_logprobs, cold.top_logprobs, "{what}");
        assert_eq!(
            cold.cached_tokens, 0,
            "{what}: nothing is cached without the cache"
        );
    }
    assert_eq!(
        warm[0].cached_tokens, 0,
        "the first turn has nothing to start on"
    );
    for turn in 1..warm.len() {
        // The turn before's prompt was computed already.
        let before = warm[turn - 1].prompt_ids.len();
        let (cached, prompt) = (
            warm[turn].cached_tokens as usize,
            warm[turn].prompt_ids.len(),
        );
        assert!(
            cached >= before && cached < prompt,
            "turn {}: {cached} of {prompt} prompt tokens cached, the turn before had {before}",
            turn + 1,
        );
    }
    // The turns before are superseded by the last one: one entry parked per stage.
    for worker in &workers {
        let info = worker_info(worker).await;
        assert_eq!(
            (info.active_sequences, info.parked_sequences),
            (0, 1),
            "{info:?}"
        );
    }
}

fn rss_mib(worker: &WorkerProcess) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", worker.pid().unwrap())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_prompts_keeps_parked_caches_within_the_bound() {
    // A stage's 15 layers keep 23 KiB a position: a prompt of ~150 tokens parks ~3.5 MiB.
    let options = worker_options(&["--max-cache-mib", "64", "--max-parked-mib", "8"]);
    let workers = vec![
        WorkerProcess::spawn(&options).await.unwrap(),
        WorkerProcess::spawn(&options).await.unwrap(),
    ];
    let client = coordinator(&workers, 256).await;
    let prompt = |i: usize| format!("Note {i}: {}", SYSTEM.repeat(3));
    let first = client
        .generate_collect(&prompt(0), &greedy(8))
        .await
        .unwrap();
    client
        .generate_collect(&prompt(1), &greedy(8))
        .await
        .unwrap();
    let rss_before: Vec<f64> = workers.iter().map(rss_mib).collect();
    // Four at a time: more would pass the 64 MiB KV bound while running, which is another test's.
    for wave in 0..6 {
        let floods = (0..4).map(|i| {
            let client = client.clone();
            let text = prompt(2 + wave * 4 + i);
            async move { client.generate_collect(&text, &greedy(8)).await }
        });
        for result in futures::future::join_all(floods).await {
            result.unwrap();
        }
    }
    for (worker, before) in workers.iter().zip(&rss_before) {
        let info = worker_info(worker).await;
        assert!(
            info.parked_bytes <= 8 << 20 && info.parked_sequences >= 1,
            "{info:?}"
        );
        assert!(info.parked_sequences < 24, "nothing was evicted: {info:?}");
        let after = rss_mib(worker);
        eprintln!(
            "worker {}: RSS {before:.1} MiB before the flood, {after:.1} after",
            worker.address
        );
        assert!(
            after - before < 24.0,
            "RSS grew from {before:.1} to {after:.1} MiB"
        );
    }
    // The first prompt's caches are long gone: it is computed again, and right.
    let again = client
        .generate_collect(&prompt(0), &greedy(8))
        .await
        .unwrap();
    assert_eq!(
        (&again.token_ids, again.cached_tokens),
        (&first.token_ids, 0)
    );
    // The last prompt's are not: all but its last two tokens are copied.
    let last = client
        .generate_collect(&prompt(26), &greedy(8))
        .await
        .unwrap();
    let hit = client
        .generate_collect(&prompt(26), &greedy(8))
        .await
        .unwrap();
    assert_eq!(hit.cached_tokens as usize, hit.prompt_ids.len() - 2);
    assert_eq!(
        (&hit.token_ids, &hit.top_logprobs),
        (&last.token_ids, &last.top_logprobs)
    );
}

/// How many leading tokens `a` and `b` share.
fn shared(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Generates `texts` at once (greedy, 8 tokens); returns the runs and how many prompt positions
/// each copied.
async fn together(client: &StrataClient, texts: &[String]) -> (Vec<Generation>, Vec<usize>) {
    let runs = texts.iter().map(|text| {
        let client = client.clone();
        async move { client.generate_collect(text, &greedy(8)).await.unwrap() }
    });
    let runs = futures::future::join_all(runs).await;
    let cached = runs.iter().map(|r| r.cached_tokens as usize).collect();
    (runs, cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_sent_together_compute_their_shared_prefix_once() {
    let workers = vec![
        WorkerProcess::spawn(&worker_options(&[])).await.unwrap(),
        WorkerProcess::spawn(&worker_options(&[])).await.unwrap(),
    ];
    let client = coordinator(&workers, 256).await;
    let prompt =
        |session: usize, q: &str| format!("Session {session}. {SYSTEM}\nCustomer: {q}\nAssistant:");

    // Three choices of one prompt, as `n = 3` sends them: whichever comes first prefills it, the
    // other two wait and copy all but its last two positions, which they compute as that prefill
    // did, bit for bit: the same tokens and log-probabilities.
    let (runs, cached) = together(&client, &vec![prompt(1, QUESTIONS[0]); 3]).await;
    let whole = runs[0].prompt_ids.len() - 2;
    let mut sorted = cached.clone();
    sorted.sort();
    assert_eq!(sorted, [0, whole, whole], "{cached:?}");
    let first = cached.iter().position(|&c| c == 0).unwrap();
    for run in &runs {
        assert_eq!(run.token_ids, runs[first].token_ids);
        assert_eq!(run.top_logprobs, runs[first].top_logprobs);
    }

    // Other questions on one system prompt: the first computes its prompt, the others wait for the
    // shared part and copy it.
    let texts: Vec<String> = QUESTIONS.iter().map(|q| prompt(2, q)).collect();
    let (runs, cached) = together(&client, &texts).await;
    let system = runs
        .iter()
        .map(|r| shared(&r.prompt_ids, &runs[0].prompt_ids))
        .min()
        .unwrap();
    eprintln!("shared system prompt: {system} tokens; cached: {cached:?}");
    assert_eq!(cached.iter().filter(|&&c| c == 0).count(), 1, "{cached:?}");
    for (run, &cached) in runs.iter().zip(&cached) {
        assert!(
            cached == 0 || (cached >= system && cached <= run.prompt_ids.len() - 2),
            "{cached} of {} cached, {system} shared by all",
            run.prompt_ids.len()
        );
    }
    for worker in &workers {
        let info = worker_info(worker).await;
        assert_eq!(info.active_sequences, 0, "{info:?}");
        assert!(info.parked_sequences >= 1, "{info:?}");
    }
}
