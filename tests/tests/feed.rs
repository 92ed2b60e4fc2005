//! The presence feed (a region's view of which gateway holds which vehicle) says it
//! caught up once it read to where each partition ended at its start, also when no
//! record is delivered at `high - 1`: here, on a real broker, the last offset is a
//! transaction's commit marker, a control record no consumer sees (a compacted-away
//! tombstone does the same). Before, the feed waited for that record for ever, and the
//! region's command dispatch with it.

use std::time::Duration;

use bridge::feed::{self, FeedItem};
use integration::kafka::Kafka;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

#[test]
fn the_feed_catches_up_when_the_last_offset_is_a_transaction_marker() {
    let kafka = Kafka::start();
    kafka.create_topic("presence-feed", 1);
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("transactional.id", "feed-test")
        .create()
        .expect("producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init transactions");
    producer.begin_transaction().expect("begin");
    for n in 0..3 {
        let payload = format!("{n}");
        producer
            .send(BaseRecord::to("presence-feed").key("car").payload(&payload))
            .map_err(|(e, _)| e)
            .expect("send");
    }
    producer
        .commit_transaction(Duration::from_secs(30))
        .expect("commit");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bootstrap = kafka.bootstrap();
    let (records, caught_up) = rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(feed::run(
            bootstrap,
            "presence-feed".into(),
            Default::default(),
            tx,
            stop.clone(),
        ));
        let mut records = 0;
        let caught_up = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(item) = rx.recv().await {
                match item {
                    FeedItem::Record(_) => records += 1,
                    FeedItem::CaughtUp => return true,
                }
            }
            false
        })
        .await;
        stop.cancel();
        let _ = task.await;
        (records, caught_up)
    });
    assert_eq!(caught_up, Ok(true), "CaughtUp after {records} records");
    assert_eq!(records, 3);
}

/// Partitions added to the topic while the feed runs are read too: a vehicle's later
/// presence events land in them (its key's partition moves with the count). Before, the
/// feed assigned the partitions it found at start and never looked again.
#[test]
fn the_feed_reads_partitions_added_to_the_topic_while_it_runs() {
    let kafka = Kafka::start();
    kafka.create_topic("presence-grows", 1);
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("producer");
    let send = |partition: i32, payload: &str| {
        producer
            .send(
                BaseRecord::to("presence-grows")
                    .key("car")
                    .payload(payload)
                    .partition(partition),
            )
            .map_err(|(e, _)| e)
            .expect("send");
        producer.flush(Duration::from_secs(30)).expect("flush");
    };
    send(0, "before");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let stop = CancellationToken::new();
    let task = rt.spawn(feed::run_checking(
        kafka.bootstrap(),
        "presence-grows".into(),
        Default::default(),
        tx,
        stop.clone(),
        Duration::from_secs(1),
    ));
    let mut next = |within: u64| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(within), rx.recv())
                .await
                .ok()
                .flatten()
        })
    };
    let payload = |item: Option<FeedItem>| match item {
        Some(FeedItem::Record(r)) => Some(String::from_utf8_lossy(&r.payload).into_owned()),
        other => panic!("expected a record, got {other:?}"),
    };
    assert_eq!(payload(next(30)), Some("before".to_string()));
    assert_eq!(next(30), Some(FeedItem::CaughtUp));

    kafka.add_partitions("presence-grows", 3);
    // The producer learns of the new partitions from its metadata refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sent = producer
            .send(
                BaseRecord::to("presence-grows")
                    .key("car")
                    .payload("after")
                    .partition(2),
            )
            .map_err(|(e, _)| e);
        if sent.is_ok() && producer.flush(Duration::from_secs(10)).is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "could not write to partition 2"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        payload(next(30)),
        Some("after".to_string()),
        "the record in the added partition reaches the feed"
    );
    stop.cancel();
    let _ = rt.block_on(task);
}
