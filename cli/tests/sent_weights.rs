//! Workers started without the model file: the coordinator sends each stage its weights, the
//! workers keep them by digest, and a restart or a re-plan sends only what a worker lacks. A cut
//! transfer resumes, wrong bytes and corrupt cache entries are caught, and a tensor outside a
//! stage's plan is refused.

mod common;

use std::path::{Path, PathBuf};

use strata_client::GenerateParams;
use strata_coordinator::plan::SplitSpec;
use strata_harness::local::WorkerProcess;
use strata_harness::{LocalCluster, LocalOptions};
use strata_model::stage_weights::{digest_bytes, stage_tensor_names, BlobRef, GgufLayout};
use strata_model::ModelFile;
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_transport::AuthToken;
use tonic::Code;

const PROMPTS: [&str; 2] = ["The capital of France is", "Once upon a time"];

/// The greedy tokens of [`PROMPTS`] on `cluster`.
async fn tokens(cluster: &LocalCluster) -> Vec<Vec<u32>> {
    let client = cluster.client().await.unwrap();
    let params = GenerateParams {
        max_tokens: 24,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut out = Vec::new();
    for prompt in PROMPTS {
        out.push(
            client
                .generate_collect(prompt, &params)
                .await
                .unwrap()
                .token_ids,
        );
    }
    out
}

/// A local cluster of two workers without the model file, caching under `cache`, with `/metrics`.
async fn sent_cluster(cache: &Path, scrape: &Path, split: SplitSpec) -> LocalCluster {
    LocalCluster::start(LocalOptions {
        weight_cache: Some(cache.to_owned()),
        split,
        http: Some("127.0.0.1:0".into()),
        metrics_token: Some(scrape.to_owned()),
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    })
    .await
    .unwrap()
}

/// `strata_weight_*` counters of `/metrics`, per worker in plan order: (bytes sent, blobs hit,
/// blobs sent).
async fn weight_counters(cluster: &LocalCluster, scrape: &str) -> Vec<(u64, u64, u64)> {
    let http = cluster.http_url().unwrap();
    let (status, body) = common::http_get(&format!("{http}/metrics"), scrape).await;
    assert_eq!(status, 200, "{body}");
    let value = |prefix: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    cluster
        .plan()
        .iter()
        .map(|(worker, _)| {
            (
                value(&format!(
                    "strata_weight_sent_bytes_total{{worker=\"{worker}\"}}"
                )),
                value(&format!(
                    "strata_weight_blobs_total{{worker=\"{worker}\",outcome=\"hit\"}}"
                )),
                value(&format!(
                    "strata_weight_blobs_total{{worker=\"{worker}\",outcome=\"sent\"}}"
                )),
            )
        })
        .collect()
}

fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 64)
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_the_model_file_serve_the_same_tokens_and_a_restart_sends_nothing() {
    let reference = {
        let cluster = LocalCluster::start(LocalOptions::new(
            common::strata(),
            2,
            common::default_model(),
        ))
        .await
        .unwrap();
        let tokens = tokens(&cluster).await;
        cluster.stop().await.unwrap();
        tokens
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let scrape = AuthToken::generate().unwrap();
    let scrape_file = dir.path().join("scrape");
    std::fs::write(&scrape_file, scrape.as_str()).unwrap();
    let model_bytes = std::fs::metadata(common::default_model()).unwrap().len();

    // First start: everything is sent, about the file's size over both workers.
    let cluster = sent_cluster(&cache, &scrape_file, SplitSpec::Even).await;
    assert_eq!(tokens(&cluster).await, reference);
    let first = weight_counters(&cluster, scrape.as_str()).await;
    let sent: u64 = first.iter().map(|c| c.0).sum();
    assert!(
        sent > model_bytes * 9 / 10 && sent < model_bytes * 3 / 2,
        "{first:?} for a file of {model_bytes} bytes"
    );
    assert!(
        first.iter().all(|&(_, hits, blobs)| hits == 0 && blobs > 0),
        "{first:?}"
    );
    cluster.stop().await.unwrap();

    // Second start of the same cluster: the caches hold everything.
    let cluster = sent_cluster(&cache, &scrape_file, SplitSpec::Even).await;
    assert_eq!(tokens(&cluster).await, reference);
    let second = weight_counters(&cluster, scrape.as_str()).await;
    for (again, before) in second.iter().zip(&first) {
        assert_eq!(*again, (0, before.2, 0), "{second:?} after {first:?}");
    }
    cluster.stop().await.unwrap();

    // A re-plan that moves five layers to the second worker sends it those layers only.
    let cluster = sent_cluster(
        &cache,
        &scrape_file,
        SplitSpec::Explicit(vec![0..10, 10..30]),
    )
    .await;
    assert_eq!(tokens(&cluster).await, reference);
    let moved = weight_counters(&cluster, scrape.as_str()).await;
    assert_eq!(moved[0].0, 0, "{moved:?}");
    assert!(
        moved[1].0 > 0 && moved[1].0 < first[1].0 / 2,
        "{moved:?} after {first:?}"
    );
    cluster.stop().await.unwrap();

    // A corrupt cache entry is caught at load and sent again; the tokens stay right.
    let victim = blob_files(&cache.join("worker-0"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let cluster = sent_cluster(&cache, &scrape_file, SplitSpec::Even).await;
    assert_eq!(tokens(&cluster).await, reference);
    let repaired = weight_counters(&cluster, scrape.as_str()).await;
    assert_eq!(repaired[0].0, bytes.len() as u64, "{repaired:?}");
    assert_eq!(repaired[1].0, 0, "{repaired:?}");
    cluster.stop().await.unwrap();

    // `--split auto` with empty caches: each worker is sent the probe stages and calibrates on
    // them, then is sent its stage, whose end layers its cache already holds.
    let cluster = sent_cluster(&dir.path().join("auto"), &scrape_file, SplitSpec::Auto).await;
    assert_eq!(tokens(&cluster).await, reference);
    let plan: Vec<_> = cluster
        .plan()
        .iter()
        .map(|(_, layers)| layers.clone())
        .collect();
    assert!(
        plan.len() == 2 && plan[0].start == 0 && plan[0].end == plan[1].start && plan[1].end == 30,
        "{plan:?}"
    );
    let auto = weight_counters(&cluster, scrape.as_str()).await;
    assert!(
        auto.iter().all(|&(sent, hits, _)| sent > 0 && hits > 0),
        "{auto:?}"
    );
    cluster.stop().await.unwrap();
}

/// A worker without the model file, and a raw client to it.
async fn bare_worker(cache: &Path) -> (WorkerProcess, WorkerClient<tonic::transport::Channel>) {
    common::raw_worker(&LocalOptions {
        weight_cache: Some(cache.to_owned()),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    })
    .await
}

fn wire(blob: &BlobRef) -> v1::Blob {
    v1::Blob {
        digest: blob.digest.to_vec(),
        size: blob.size,
    }
}

fn chunk(blob: &BlobRef, offset: u64, data: &[u8]) -> v1::BlobChunk {
    v1::BlobChunk {
        blob: Some(wire(blob)),
        offset,
        data: data.to_vec().into(),
    }
}

async fn push(
    client: &mut WorkerClient<tonic::transport::Channel>,
    chunks: Vec<v1::BlobChunk>,
) -> Result<v1::PushBlobsResponse, tonic::Status> {
    client
        .push_blobs(tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

async fn held(client: &mut WorkerClient<tonic::transport::Channel>, blob: &BlobRef) -> u64 {
    client
        .have_blobs(v1::HaveBlobsRequest {
            blobs: vec![wire(blob)],
        })
        .await
        .unwrap()
        .into_inner()
        .held_bytes[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_transfers_resume_and_wrong_or_unplanned_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_worker, mut client) = bare_worker(dir.path()).await;
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert!(
        info.weights_from_coordinator && info.model.is_none(),
        "{info:?}"
    );

    let path = common::default_model();
    let model = ModelFile::open(&path).unwrap();
    let layout = GgufLayout::read(&model).unwrap();
    let file = std::fs::read(&path).unwrap();
    let slice = |offset: u64, size: u64| &file[offset as usize..(offset + size) as usize];
    let header_bytes = slice(0, layout.header_bytes);
    let header = digest_bytes(header_bytes);
    let names = stage_tensor_names(layout.tensors.keys().map(String::as_str), 0..2, 30);
    let tensors: Vec<(String, BlobRef, &[u8])> = names
        .iter()
        .map(|name| {
            let (offset, size) = layout.tensors[name];
            let bytes = slice(offset, size);
            (name.clone(), digest_bytes(bytes), bytes)
        })
        .collect();
    let load = |weights: v1::StageWeights| v1::LoadStageRequest {
        model_fingerprint: model.fingerprint.clone(),
        layers: Some(v1::LayerRange { start: 0, end: 2 }),
        output_dtype: 0,
        weights: Some(weights),
    };
    let named = |list: &[(String, BlobRef, &[u8])]| -> Vec<v1::NamedBlob> {
        list.iter()
            .map(|(name, blob, _)| v1::NamedBlob {
                name: name.clone(),
                blob: Some(wire(blob)),
            })
            .collect()
    };

    // Wrong bytes for a digest: stored, but the LoadStage that reads them refuses them and drops
    // them, before anything is loaded.
    let mut wrong = header_bytes.to_vec();
    wrong[100] ^= 1;
    let pushed = push(&mut client, vec![chunk(&header, 0, &wrong)]).await;
    assert_eq!(pushed.unwrap().blobs_completed, 1);
    let status = client
        .load_stage(load(v1::StageWeights {
            header: Some(wire(&header)),
            tensors: named(&tensors),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("send it again"), "{status:?}");
    assert_eq!(held(&mut client, &header).await, 0);

    // Half a header, then the transfer is cut: the worker says where to resume.
    let half = header.size / 2;
    push(
        &mut client,
        vec![chunk(&header, 0, &header_bytes[..half as usize])],
    )
    .await
    .unwrap();
    assert_eq!(held(&mut client, &header).await, half);
    let early = load(v1::StageWeights {
        header: Some(wire(&header)),
        tensors: named(&tensors),
    });
    let status = client.load_stage(early).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("push it first"), "{status:?}");
    let status = push(&mut client, vec![chunk(&header, 0, header_bytes)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&format!("first {half} bytes")),
        "{status:?}"
    );
    let rest = chunk(&header, half, &header_bytes[half as usize..]);
    assert_eq!(
        push(&mut client, vec![rest]).await.unwrap().blobs_completed,
        1
    );
    assert_eq!(held(&mut client, &header).await, header.size);

    // The stage's tensors, in chunks.
    let chunks: Vec<v1::BlobChunk> = tensors
        .iter()
        .flat_map(|(_, blob, bytes)| {
            bytes
                .chunks(64 << 10)
                .enumerate()
                .map(|(i, part)| chunk(blob, (i * (64 << 10)) as u64, part))
                .collect::<Vec<_>>()
        })
        .collect();
    let pushed = push(&mut client, chunks).await.unwrap();
    assert_eq!(pushed.blobs_completed as usize, tensors.len());

    // A tensor of another layer, a missing one, and a size the header does not say: refused.
    let (offset, size) = layout.tensors["blk.5.attn_q.weight"];
    let foreign = slice(offset, size);
    let foreign_blob = digest_bytes(foreign);
    push(&mut client, vec![chunk(&foreign_blob, 0, foreign)])
        .await
        .unwrap();
    let mut with_foreign = tensors.clone();
    with_foreign.push(("blk.5.attn_q.weight".into(), foreign_blob, foreign));
    let status = client
        .load_stage(load(v1::StageWeights {
            header: Some(wire(&header)),
            tensors: named(&with_foreign),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("not one that layers 0..2"),
        "{status:?}"
    );
    let status = client
        .load_stage(load(v1::StageWeights {
            header: Some(wire(&header)),
            tensors: named(&tensors[1..]),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("was not sent"), "{status:?}");
    let mut resized = tensors.clone();
    resized[0].1.size += 4;
    let status = client
        .load_stage(load(v1::StageWeights {
            header: Some(wire(&header)),
            tensors: named(&resized),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("header entry"), "{status:?}");
    assert_eq!(
        client
            .info(v1::InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .loaded,
        None,
        "nothing half-loaded"
    );

    // Everything right: the stage loads and serves.
    let loaded = client
        .load_stage(load(v1::StageWeights {
            header: Some(wire(&header)),
            tensors: named(&tensors),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(loaded.epoch, 0);
    assert!(loaded.has_embedding && !loaded.has_head);

    // A calibration needs the probe stages' weights, all of them.
    let calibrate = |weights: Option<v1::StageWeights>| v1::CalibrateRequest {
        rows: 2,
        context: 8,
        keep_probes: false,
        weights,
        model_fingerprint: model.fingerprint.clone(),
    };
    let status = client.calibrate(calibrate(None)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("probe stages"), "{status:?}");
    let stage_only = v1::StageWeights {
        header: Some(wire(&header)),
        tensors: named(&tensors),
    };
    let status = client
        .calibrate(calibrate(Some(stage_only)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("was not sent"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_its_own_model_file_takes_no_weights() {
    let (_worker, mut client) = common::raw_worker(&LocalOptions::new(
        common::strata(),
        1,
        common::default_model(),
    ))
    .await;
    let blob = digest_bytes(b"weights");
    let status = client
        .have_blobs(v1::HaveBlobsRequest {
            blobs: vec![wire(&blob)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = push(&mut client, vec![chunk(&blob, 0, b"weights")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert!(!info.weights_from_coordinator);
}
