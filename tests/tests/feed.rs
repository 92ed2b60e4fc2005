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
