//! A short soak (the long one is `strata bench soak`, recorded in BENCHMARKS.md): concurrent clients,
//! some hanging up mid-stream; nothing lost or wrong, every cache freed, memory back near baseline.

mod common;

use strata_harness::soak::{soak, SoakOptions};
use strata_harness::{LocalCluster, LocalOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_with_hangups_lose_nothing() {
    let mut cluster = LocalCluster::start(LocalOptions {
        threads: Some(1),
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    })
    .await
    .unwrap();
    let options = SoakOptions {
        clients: 8,
        requests_per_client: 4,
        cancel_fraction: 0.25,
        max_tokens: 24,
        prompts: 6,
        seed: 7,
    };
    let report = soak(&mut cluster, &options).await.unwrap();
    eprintln!("{}", report.render());
    assert_eq!(
        report.completed + report.cancelled,
        32,
        "{:?}",
        report.problems
    );
    assert!(report.cancelled > 0, "the seed should cancel some requests");
    assert_eq!(report.wrong, 0, "{:?}", report.problems);
    assert_eq!(report.lost, 0, "{:?}", report.problems);
    assert!(report.active_after.iter().all(|&a| a == 0), "{report:?}");
    if !report.rss_after_warmup_mib.is_empty() {
        // Generous here (a short run on a shared CI machine); the long run holds 10%.
        assert!(report.rss_growth < 0.5, "{}", report.render());
    }
    cluster.stop().await.unwrap();
}
